//! The local stack's credentials: one bearer token per person role (admin, operator, reader) and
//! per service, and the identities file listing their SHA-256, all under `<data dir>/auth/`
//! (the folder 0700, every file 0600). `merklectl up` makes them once and reuses them; its
//! services read their own token and the identities file; every other command presents a token
//! found by [`install_for_commands`].

use std::{
    io::{Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use merkle_shared::auth::{ServiceRole, identities::token_hash, token};

/// The folder, inside a data folder.
pub const DIR: &str = "auth";
/// The people's roles, each with a token of its own.
pub const PEOPLE: [&str; 3] = ["admin", "operator", "reader"];
/// The variable naming the token file a command presents.
pub const TOKEN_FILE_VARIABLE: &str = "MERKLE_TOKEN_FILE";

/// The credentials in one folder.
#[derive(Debug, Clone)]
pub struct Credentials {
    dir: PathBuf,
}

impl Credentials {
    /// The credentials under `data_dir/auth`, made where missing (existing tokens are kept, so
    /// a restarted stack keeps its callers). Safe when several processes make them at once.
    pub fn ensure(data_dir: &Path) -> anyhow::Result<Credentials> {
        Credentials::ensure_in(&data_dir.join(DIR))
    }

    /// The credentials in `dir` itself (`merklectl credentials DIR`, for a Kubernetes Secret).
    pub fn ensure_in(dir: &Path) -> anyhow::Result<Credentials> {
        let dir = dir.to_owned();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let credentials = Credentials { dir };
        let mut lines = vec![
            "# Who may call this stack's services, and as what (docs/security.md). Made by"
                .to_owned(),
            "# merklectl up; each token is in <name>.token beside this file.".to_owned(),
            "identities:".to_owned(),
        ];
        let services = ServiceRole::ALL.map(|s| (s.name(), format!("service:{}", s.name())));
        let people = PEOPLE.map(|p| (p, p.to_owned()));
        for (name, role) in people.iter().chain(services.iter()) {
            let token = credentials.token(name)?;
            lines.push(format!("  - name: {name}"));
            lines.push(format!("    role: {role}"));
            lines.push(format!(
                "    token_sha256: {}",
                merkle_core::digest::hex(&token_hash(&token))
            ));
        }
        lines.push(String::new());
        // Written whole and renamed into place: a reader never sees half a file.
        let file = credentials.identities_file();
        let partial = credentials
            .dir
            .join(format!(".identities.{}", std::process::id()));
        write_private(&partial, lines.join("\n").as_bytes(), false)?;
        std::fs::rename(&partial, &file).with_context(|| format!("writing {}", file.display()))?;
        if !credentials.seal_key_file().exists() {
            let _ = write_private(&credentials.seal_key_file(), random_hex()?.as_bytes(), true);
        }
        Ok(credentials)
    }

    /// The identities file the services read (`AUTH_IDENTITIES_FILE`).
    pub fn identities_file(&self) -> PathBuf {
        self.dir.join("identities.yaml")
    }

    /// The file holding `name`'s token (a person role or a service's name).
    pub fn token_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.token"))
    }

    /// The key Discovery's replicas seal their cache values with (`CACHE_SEAL_KEY_FILE`).
    pub fn seal_key_file(&self) -> PathBuf {
        self.dir.join("discovery-cache-seal.key")
    }

    /// `name`'s token, made when missing.
    pub fn token(&self, name: &str) -> anyhow::Result<String> {
        let path = self.token_file(name);
        if !path.exists() {
            // Another process may make it at the same moment: one wins, both read its token.
            let _ = write_private(&path, random_hex()?.as_bytes(), true);
        }
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(token.trim().to_owned())
    }

    /// The environment of one of the stack's services: who may call it, and its own token.
    pub fn service_env(&self, service: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (
                "AUTH_IDENTITIES_FILE",
                self.identities_file().display().to_string(),
            ),
            (
                "AUTH_TOKEN_FILE",
                self.token_file(service).display().to_string(),
            ),
        ];
        if service == "discovery" {
            env.push((
                "CACHE_SEAL_KEY_FILE",
                self.seal_key_file().display().to_string(),
            ));
        }
        env
    }
}

/// `merklectl credentials DIR`.
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialsArgs {
    /// The folder to make them in (made 0700; existing tokens are kept).
    pub dir: PathBuf,
}

/// Makes the credentials in a folder and says what they are for.
pub fn run(args: CredentialsArgs) -> anyhow::Result<()> {
    let credentials = Credentials::ensure_in(&args.dir)?;
    println!(
        "{}: identities.yaml (who may call, as what), a token per role (admin, operator, \
         reader) and per service, discovery-cache-seal.key",
        args.dir.display()
    );
    println!(
        "for the chart: kubectl -n merkle-mesh create secret generic merkle-mesh-auth --from-file={}",
        args.dir.display()
    );
    println!(
        "for merklectl: {TOKEN_FILE_VARIABLE}={}",
        credentials.token_file("admin").display()
    );
    Ok(())
}

/// 32 random bytes in hex.
fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(merkle_core::digest::hex(&bytes))
}

/// Writes a file only its owner may read; `new` fails when it exists.
fn write_private(path: &Path, content: &[u8], new: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(content))
        .with_context(|| format!("writing {}", path.display()))
}

/// The token a command presents, installed for every call it makes: the file
/// `$MERKLE_TOKEN_FILE`, else the admin token of a stack started here (`.data/auth/`), else
/// none (the services then answer UNAUTHENTICATED, and the error says what to set).
pub fn install_for_commands() -> anyhow::Result<()> {
    let path = match std::env::var_os(TOKEN_FILE_VARIABLE).filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => {
            let local = Path::new(".data").join(DIR).join("admin.token");
            if !local.is_file() {
                return Ok(());
            }
            local
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{TOKEN_FILE_VARIABLE}: reading {}", path.display()))?;
    token::install(&text)
        .map_err(|rule| anyhow::anyhow!("{TOKEN_FILE_VARIABLE}: {}: {rule}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use merkle_shared::auth::identities::Identities;

    #[test]
    fn credentials_are_made_once_private_and_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Credentials::ensure(dir.path()).expect("made");
        let admin = first.token("admin").expect("token");
        let again = Credentials::ensure(dir.path()).expect("reused");
        assert_eq!(again.token("admin").expect("token"), admin);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&first.token_file("admin")), 0o600);
        assert_eq!(mode(&first.identities_file()), 0o600);
        assert_eq!(mode(&dir.path().join(DIR)), 0o700);
        let text = std::fs::read_to_string(first.identities_file()).expect("read");
        let ids = Identities::parse(&text).expect("valid identities");
        assert_eq!(ids.len(), PEOPLE.len() + ServiceRole::ALL.len());
        let found = ids.by_token(&admin).expect("admin listed");
        assert_eq!(&*found.name, "admin");
        assert!(!text.contains(&admin), "the identities file holds no token");
    }
}
