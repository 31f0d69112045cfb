//! The CA directory: `ca.pem` and `ca.key` loaded from `--ca-dir`, or created there
//! on first use. The key is created 0600 from its first byte; a key file that others can
//! read, or anyone but its owner can write, is refused; files are written under a
//! temporary name and linked into place, so a crash never leaves half a CA behind.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::ca::{CaError, CertificateAuthority, CERT_FILE, KEY_FILE};

impl CertificateAuthority {
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let key_pem = read_private(&key_path)?;
                let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
                let origin = |path: &Path| path.display().to_string();
                Self::build_guarded(&cert_pem, &key_pem, &origin(&cert_path), &origin(&key_path))
            }
            (false, false) => {
                let ca = Self::generate()?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io(dir))?;
                // Key first, and never over an existing one: of two processes creating
                // the CA at once, the loser fails here instead of pairing its ca.pem
                // with the other's ca.key (on filesystems with hard links).
                place_new(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
                place_new(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
                Ok(ca)
            }
            (true, false) => Err(CaError::Incomplete(key_path, cert_path)),
            (false, true) => Err(CaError::Incomplete(cert_path, key_path)),
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |e| CaError::Io(path.to_owned(), e)
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(io(path))
}

/// Group-read is tolerated: a Kubernetes Secret mounted for a non-root user with
/// fsGroup is root-owned, so 0440 is the tightest mode that user can read. Anything
/// beyond that (group write, any access by others) is refused.
const FORBIDDEN_KEY_BITS: u32 = 0o037;

/// Checks the mode on the opened file, so what is checked is what is read.
fn read_private(path: &Path) -> Result<String, CaError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mode = file.metadata().map_err(io(path))?.permissions().mode() & 0o777;
    if mode & FORBIDDEN_KEY_BITS != 0 {
        return Err(CaError::KeyPermissions(path.to_owned(), mode));
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem).map_err(io(path))?;
    Ok(pem)
}

/// Written under a temporary name in the same directory, then linked into place
/// without replacing anything (renamed where hard links are unsupported): a crash
/// never leaves a half file under the real name.
fn place_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let placed = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => fs::rename(&tmp, path),
            linked => linked,
        });
    // Best effort: after a rename there is nothing left to remove.
    let _ = fs::remove_file(&tmp);
    placed.map_err(io(path))?;
    // The new directory entry must survive a power loss as the contents do.
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn temp_dir() -> TempDir {
        let name = format!("lrp-ca-{}-{:x}", std::process::id(), fastrand::u64(..));
        TempDir(std::env::temp_dir().join(name))
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn load_err(dir: &Path) -> String {
        CertificateAuthority::load_or_create(dir)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn created_once_then_loaded() {
        let tmp = temp_dir();
        let dir = tmp.0.join("ca");
        let created = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&dir.join(KEY_FILE))), (0o700, 0o600));
        let pem = fs::read_to_string(dir.join(CERT_FILE)).unwrap();
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary files left"
        );
        let loaded = CertificateAuthority::load_or_create(&dir).unwrap();
        assert_eq!((created.cert_pem(), loaded.cert_pem()), (&*pem, &*pem));
        assert_eq!(created.cert_der(), loaded.cert_der());
        let debug = format!("{loaded:?}");
        assert!(
            debug.contains("***") && !debug.contains("PRIVATE"),
            "{debug}"
        );
    }

    #[test]
    fn a_missing_half_or_an_exposed_key_is_refused() {
        let tmp = temp_dir();
        let (cert, key) = (tmp.0.join(CERT_FILE), tmp.0.join(KEY_FILE));
        CertificateAuthority::load_or_create(&tmp.0).unwrap();
        for exposed in [0o644, 0o604, 0o620, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(exposed)).unwrap();
            assert!(load_err(&tmp.0).contains("run `chmod 600 /"), "{exposed:o}");
        }
        for tolerated in [0o400, 0o440, 0o640] {
            fs::set_permissions(&key, fs::Permissions::from_mode(tolerated)).unwrap();
            CertificateAuthority::load_or_create(&tmp.0).unwrap();
        }
        let saved = fs::read(&key).unwrap();
        fs::remove_file(&key).unwrap();
        assert!(load_err(&tmp.0).contains("ca.key is missing"));
        fs::write(&key, saved).unwrap();
        fs::remove_file(&cert).unwrap();
        assert!(load_err(&tmp.0).contains("ca.pem is missing"));
    }
}
