//! Keeping secrets secret: `Debug` that shows whether a secret is set but never its
//! value, a comparison of secrets whose time does not depend on where they differ,
//! and files and directories only their owner can read.

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// What a redacted value prints instead of itself.
pub const MASK: &str = "***";

/// Wraps a secret for `Debug`: `None` and empty values show as such (whether a
/// secret is configured is useful to see), anything else as `***`.
pub struct Redacted<'a, T: ?Sized>(pub &'a T);

/// How much of a secret-holding value `Debug` may reveal: only whether it is set.
pub trait Secret {
    /// How many secrets the value holds (0 when unset or empty).
    fn count(&self) -> usize;
}

impl Secret for String {
    fn count(&self) -> usize {
        usize::from(!self.is_empty())
    }
}

impl Secret for str {
    fn count(&self) -> usize {
        usize::from(!self.is_empty())
    }
}

impl<T: Secret> Secret for Option<T> {
    fn count(&self) -> usize {
        self.as_ref().map_or(0, Secret::count)
    }
}

impl<T: Secret> Secret for Vec<T> {
    fn count(&self) -> usize {
        self.iter().map(Secret::count).sum()
    }
}

impl<T: Secret + ?Sized> fmt::Debug for Redacted<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.count() {
            0 => f.write_str("<unset>"),
            1 => f.write_str(MASK),
            n => write!(f, "[{MASK}; {n}]"),
        }
    }
}

/// Whether two secrets are equal, in a time that depends on neither where they
/// differ nor how long they are: both are hashed, and the digests compared in
/// constant time.
pub fn same(given: &[u8], expected: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.ct_eq(&b).into()
}

/// Creates `dir` (and missing parents) readable by its owner only (0700). An
/// existing directory is left as it is; when others may read or enter it, the
/// warning to log is returned.
pub fn private_dir(dir: &Path) -> io::Result<Option<String>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    looser_than(dir, 0o700, "directory")
}

/// The warning to log when the file `path` is readable or writable by others
/// than its owner (it should be 0600); `None` when it is private or absent.
pub fn check_private_file(path: &Path) -> io::Result<Option<String>> {
    match looser_than(path, 0o600, "file") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        other => other,
    }
}

fn looser_than(path: &Path, wanted: u32, what: &str) -> io::Result<Option<String>> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then(|| {
        format!(
            "the {what} {} has mode {mode:04o}: others than its owner can reach the secrets \
             in it; `chmod {wanted:o}` it",
            path.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_shows_only_whether_a_secret_is_set() {
        let shown = |v: &dyn fmt::Debug| format!("{v:?}");
        assert_eq!(shown(&Redacted(&Some("hunter2".to_owned()))), "***");
        assert_eq!(shown(&Redacted(&None::<String>)), "<unset>");
        assert_eq!(shown(&Redacted(&String::new())), "<unset>");
        assert_eq!(
            shown(&Redacted(&vec!["k1".to_owned(), "k2".to_owned()])),
            "[***; 2]"
        );
    }

    #[test]
    fn same_compares_whole_secrets() {
        assert!(same(b"token-0123", b"token-0123"));
        assert!(same(b"", b""));
        for (a, b) in [
            (&b"token-0123"[..], &b"token-0124"[..]),
            (b"token-0123", b"token-012"),
            (b"token-012", b"token-0123"),
            (b"", b"x"),
            (b"Token-0123", b"token-0123"),
        ] {
            assert!(!same(a, b), "{a:?} {b:?}");
        }
    }

    #[test]
    fn private_dir_is_0700_and_a_looser_one_is_reported() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        assert_eq!(private_dir(&dir).unwrap(), None);
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let warning = private_dir(&dir).unwrap().expect("a warning");
        assert!(
            warning.contains("0755") && warning.contains("chmod 700"),
            "{warning}"
        );
        // It is left as the operator made it.
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn a_readable_secrets_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        assert_eq!(check_private_file(&path).unwrap(), None, "absent is fine");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check_private_file(&path).unwrap(), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = check_private_file(&path).unwrap().expect("a warning");
        assert!(
            warning.contains("0644") && warning.contains("chmod 600"),
            "{warning}"
        );
    }
}
