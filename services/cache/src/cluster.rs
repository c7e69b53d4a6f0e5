//! The shape of a Redis Cluster as the Cache last saw it: which master serves each slot and
//! how many replicas it has online. The cluster client routes commands by itself; this is
//! only for deciding how many replicas a latest-root write can wait for (a master that lost
//! its replica in a failover has none to wait for until one comes back).

use parking_lot::RwLock;

use redis::Value;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The slot of a key: CRC16 (XMODEM) of the key, or of its hash tag (the part between the
/// first `{` and the next `}`, when not empty), modulo 16384.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// One range of slots, its master and the master's online replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub master: (String, u16),
    pub replicas: u32,
}

/// The ranges, from `CLUSTER SLOTS`.
#[derive(Debug, Default)]
pub struct Topology {
    ranges: RwLock<Vec<SlotRange>>,
}

impl Topology {
    /// Replaces the known ranges with those of a `CLUSTER SLOTS` answer.
    pub fn update(&self, answer: &Value) -> Result<(), String> {
        let ranges = parse_slots(answer)?;
        *self.ranges.write() = ranges;
        Ok(())
    }

    /// The online replicas of the master serving `slot`; `None` when not known yet.
    pub fn replicas_of_slot(&self, slot: u16) -> Option<u32> {
        let ranges = self.ranges.read();
        ranges
            .iter()
            .find(|r| (r.first..=r.last).contains(&slot))
            .map(|r| r.replicas)
    }

    /// The master serving `slot` (`host`, `port`); `None` when not known yet.
    pub fn master_of_slot(&self, slot: u16) -> Option<(String, u16)> {
        let ranges = self.ranges.read();
        ranges
            .iter()
            .find(|r| (r.first..=r.last).contains(&slot))
            .map(|r| r.master.clone())
    }

    /// The online replicas of the master at `host:port`; `None` when not known.
    pub fn replicas_of_master(&self, host: &str, port: u16) -> Option<u32> {
        let ranges = self.ranges.read();
        ranges
            .iter()
            .find(|r| r.master.0 == host && r.master.1 == port)
            .map(|r| r.replicas)
    }
}

/// `CLUSTER SLOTS`: an array of `[first, last, [master host, port, id, ...], [replica ...]...]`
/// (Redis leaves failed replicas out).
fn parse_slots(answer: &Value) -> Result<Vec<SlotRange>, String> {
    let Value::Array(ranges) = answer else {
        return Err(format!("CLUSTER SLOTS answered {answer:?}"));
    };
    ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else {
                return Err(format!("a CLUSTER SLOTS range is {range:?}"));
            };
            let int = |v: Option<&Value>| match v {
                Some(Value::Int(n)) => u16::try_from(*n).map_err(|e| e.to_string()),
                other => Err(format!("a slot or port is {other:?}")),
            };
            let (first, last) = (int(fields.first())?, int(fields.get(1))?);
            let Some(Value::Array(master)) = fields.get(2) else {
                return Err(format!("a range's master is {:?}", fields.get(2)));
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                other => return Err(format!("a master's host is {other:?}")),
            };
            Ok(SlotRange {
                first,
                last,
                master: (host, int(master.get(1))?),
                replicas: fields.len().saturating_sub(3) as u32,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_of_redis_and_hash_tags_share_one() {
        // The redis crate's own slot function, and CLUSTER KEYSLOT's documented examples.
        for key in [
            "merkle:v2:latest_root:docs",
            "merkle:v2:{notices}:holders",
            "a",
            "",
            "{}x",
            "x{}{y}",
        ] {
            let ours = slot_of(key.as_bytes());
            assert_eq!(
                redis::cluster_routing::Slot::new(ours),
                Some(redis::cluster_routing::Slot::for_key(key)),
                "{key}"
            );
        }
        assert_eq!(slot_of(b"somekey"), 11058);
        assert_eq!(slot_of(b"foo{hash_tag}"), slot_of(b"hash_tag"));
        assert_eq!(
            slot_of(b"merkle:v2:{notices}:holders"),
            slot_of(b"merkle:v2:{notices}:latest_root")
        );
    }

    #[test]
    fn replicas_are_counted_per_range() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node(7001)]),
        ]);
        let topology = Topology::default();
        assert_eq!(
            topology.replicas_of_slot(0),
            None,
            "unknown before an update"
        );
        topology.update(&answer).expect("parsed");
        assert_eq!(topology.replicas_of_slot(100), Some(1));
        assert_eq!(topology.replicas_of_slot(16383), Some(0));
        assert_eq!(topology.replicas_of_master("127.0.0.1", 7001), Some(0));
        assert_eq!(
            topology.master_of_slot(5461),
            Some(("127.0.0.1".to_owned(), 7001))
        );
        assert!(topology.update(&Value::Int(3)).is_err());
    }
}
