-- Fleet drift reads every `<source>@<node>` history of a fleet source: a range of names by
-- their bytes. The primary key's collation may order `@` apart from its neighbours (most
-- locales set punctuation aside), so this index orders the names bytewise.
CREATE INDEX merkle_sources_by_bytes ON merkle_sources (name COLLATE "C");
