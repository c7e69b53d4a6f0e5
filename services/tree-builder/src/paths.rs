//! Where builds may run: requested paths are resolved against the allowed roots, once, here.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

use crate::error::Error;

/// The longest path and file name Linux accepts, in bytes.
const PATH_MAX: usize = 4095;
const NAME_MAX: usize = 255;

/// The allowed roots, canonicalized once at start.
#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Resolves each configured root (following symlinks, once, explicitly) and logs where a
    /// root resolved to somewhere else.
    pub fn resolve(configured: &[PathBuf]) -> io::Result<AllowedRoots> {
        let mut roots = Vec::with_capacity(configured.len());
        for root in configured {
            let canonical = root.canonicalize()?;
            if &canonical != root {
                tracing::info!(configured = %root.display(), resolved = %canonical.display(), "allowed root resolved");
            }
            roots.push(canonical);
        }
        Ok(AllowedRoots { roots })
    }

    /// The canonical directory a request's `path` names, if it is allowed.
    pub fn check(&self, requested: &str) -> Result<PathBuf, Error> {
        if requested.is_empty() {
            return Err(Error::BadRequest("path: must not be empty".into()));
        }
        // What the kernel would refuse is refused here, naming the rule.
        if requested.contains('\0') {
            return Err(Error::BadRequest(
                "path: must not contain a NUL byte".into(),
            ));
        }
        if requested.len() > PATH_MAX {
            return Err(Error::BadRequest(format!(
                "path: is {} bytes; at most {PATH_MAX} (PATH_MAX)",
                requested.len()
            )));
        }
        if let Some(long) = requested.split('/').find(|c| c.len() > NAME_MAX) {
            return Err(Error::BadRequest(format!(
                "path: a component is {} bytes; at most {NAME_MAX} (NAME_MAX)",
                long.len()
            )));
        }
        let path = Path::new(requested);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(Error::PermissionDenied(format!(
                "path: {requested:?} has a '..' component, which is never allowed"
            )));
        }
        let joined = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.roots
                .first()
                .ok_or_else(|| Error::PermissionDenied("no allowed roots are configured".into()))?
                .join(path)
        };
        let canonical = joined.canonicalize().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Error::NotFound(format!("path: {requested:?} does not exist"))
            }
            _ => Error::FailedPrecondition(format!("path: {requested:?} cannot be resolved: {e}")),
        })?;
        if !self.roots.iter().any(|root| canonical.starts_with(root)) {
            return Err(Error::PermissionDenied(format!(
                "path: {requested:?} resolves to {} which is outside the allowed roots ({})",
                canonical.display(),
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !canonical.is_dir() {
            return Err(Error::BadRequest(format!(
                "path: {requested:?} is not a directory"
            )));
        }
        Ok(canonical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> AllowedRoots {
        AllowedRoots::resolve(&[dir.to_path_buf()]).expect("resolve")
    }

    #[test]
    fn paths_inside_are_resolved_and_outside_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let allowed = tmp.path().join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).expect("mkdir");
        std::fs::create_dir_all(tmp.path().join("other")).expect("mkdir");
        std::os::unix::fs::symlink(tmp.path().join("other"), allowed.join("escape"))
            .expect("symlink");
        std::os::unix::fs::symlink(allowed.join("sub"), allowed.join("inner")).expect("symlink");
        let roots = roots(&allowed);
        let canonical = allowed.canonicalize().expect("canonical");

        assert_eq!(roots.check("sub").expect("relative"), canonical.join("sub"));
        assert_eq!(
            roots
                .check(allowed.join("sub").to_str().expect("utf8"))
                .expect("absolute"),
            canonical.join("sub")
        );
        // A symlink inside that stays inside resolves to its target.
        assert_eq!(
            roots.check("inner").expect("inner link"),
            canonical.join("sub")
        );
        assert!(matches!(
            roots.check("escape"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            roots.check("sub/../sub"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(roots.check("/"), Err(Error::PermissionDenied(_))));
        assert!(matches!(roots.check("missing"), Err(Error::NotFound(_))));
        assert!(matches!(roots.check(""), Err(Error::BadRequest(_))));
        for bad in [
            "sub\0x".to_owned(),
            format!("sub/{}", "n".repeat(256)),
            "d/".repeat(2100),
        ] {
            match roots.check(&bad) {
                Err(Error::BadRequest(rule)) => assert!(rule.starts_with("path: "), "{rule}"),
                other => panic!("{:.40}: {other:?}", bad),
            }
        }
    }
}
