//! The CA directory: `ca.pem` and `ca.key` loaded from `--ca-dir`, or created there
//! on first use. The key is created 0600 from its first byte; a key file that others can
//! read, or anyone but its owner can write, is refused, and so is a directory that
//! others can write to (they could swap in a CA of their own); files are written under
//! a temporary name and linked into place, so a crash never leaves half a CA behind.
//!
//! Rotation (`ca --renew`): a new pair replaces the old, whose certificate is kept as
//! `ca-previous.pem` so that bots can trust both while they change over; the old key
//! is removed.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::ca::{CaError, CaPlan, CertificateAuthority};

/// The CA's certificate, for bots to trust.
pub(super) const CERT_FILE: &str = "ca.pem";
/// The CA's key, readable by its owner only.
pub(super) const KEY_FILE: &str = "ca.key";
/// The certificate a renewal replaced, for bots to trust until they have the new one.
pub const PREVIOUS_CERT_FILE: &str = "ca-previous.pem";

impl CertificateAuthority {
    /// The CA in `dir`, as it is; or a new one made to `plan` if there is none.
    pub fn load_or_create(dir: &Path, plan: &CaPlan) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let shared_dir = check_dir(dir)?;
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(dir, shared_dir),
            (false, false) if shared_dir => Err(CaError::DirWritable(dir.to_owned(), 0o1777)),
            (false, false) => {
                let ca = Self::generate(plan)?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io(dir))?;
                // Key first, and never over an existing one: of two processes creating
                // the CA at once, the loser fails here instead of pairing its ca.pem
                // with the other's ca.key (on filesystems with hard links).
                place_new(&key_path, ca.key_pem().as_bytes(), 0o600)?;
                place_new(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
                Ok(ca)
            }
            (true, false) => Err(CaError::Incomplete(key_path, cert_path)),
            (false, true) => Err(CaError::Incomplete(cert_path, key_path)),
        }
    }

    /// What [`Self::load_or_create`] would refuse, without creating anything: the CA
    /// in `dir`, loaded and checked, if there is one; else whether it could be made
    /// there (the directory, or its nearest existing parent, is one this user can
    /// write to).
    pub(crate) fn check(dir: &Path) -> Result<Option<Self>, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let shared_dir = check_dir(dir)?;
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Self::load(dir, shared_dir).map(Some),
            (false, false) if shared_dir => Err(CaError::DirWritable(dir.to_owned(), 0o1777)),
            (false, false) => check_creatable(dir).map(|()| None),
            (true, false) => Err(CaError::Incomplete(key_path, cert_path)),
            (false, true) => Err(CaError::Incomplete(cert_path, key_path)),
        }
    }

    fn load(dir: &Path, shared_dir: bool) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if shared_dir {
            check_owner(&key_path)?;
            check_owner(&cert_path)?;
        }
        let key_pem = read_private(&key_path)?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let origin = |path: &Path| path.display().to_string();
        Self::from_material(&cert_pem, &key_pem, &origin(&cert_path), &origin(&key_path))
    }

    /// Replaces the CA in `dir` with a new one made to `plan`. The old certificate is
    /// kept as [`PREVIOUS_CERT_FILE`]; a running proxy goes on with the old CA until it
    /// restarts. Returns the new CA and the old certificate, if there was one.
    pub fn renew(dir: &Path, plan: &CaPlan) -> Result<(Self, Option<String>), CaError> {
        if check_dir(dir)? {
            return Err(CaError::DirWritable(dir.to_owned(), 0o1777));
        }
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let previous = match fs::read_to_string(&cert_path) {
            Ok(pem) => Some(pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CaError::Io(cert_path, e)),
        };
        let ca = Self::generate(plan)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        if let Some(pem) = &previous {
            replace(&dir.join(PREVIOUS_CERT_FILE), pem.as_bytes(), 0o644)?;
        }
        // Key first: a crash in between leaves a pair that does not match, which the
        // next start reports, rather than a new certificate with the old key.
        replace(&key_path, ca.key_pem().as_bytes(), 0o600)?;
        replace(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
        Ok((ca, previous))
    }
}

/// Refuses a directory others can write to, unless it is sticky (like /tmp, or a
/// Kubernetes Secret volume): there nobody can replace another user's files, so the
/// files are checked instead. Returns whether the directory is such a shared one.
fn check_dir(dir: &Path) -> Result<bool, CaError> {
    let meta = match fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(CaError::Io(dir.to_owned(), e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 == 0 {
        return Ok(false);
    }
    if mode & 0o1000 == 0 {
        return Err(CaError::DirWritable(dir.to_owned(), mode));
    }
    Ok(true)
}

/// The CA could be created in `dir`: it, or the nearest of its parents that exists,
/// is a directory this user can create files in (tried with a file removed at once).
fn check_creatable(dir: &Path) -> Result<(), CaError> {
    let mut place = dir;
    loop {
        match fs::metadata(place) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                let not_dir =
                    std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory");
                return Err(CaError::Io(place.to_owned(), not_dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                place = match place.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent,
                    // A relative path: its last parent is the working directory.
                    _ if place != Path::new(".") => Path::new("."),
                    _ => return Err(CaError::Io(place.to_owned(), e)),
                };
            }
            Err(e) => return Err(CaError::Io(place.to_owned(), e)),
        }
    }
    let probe = place.join(format!(
        ".line-retry-proxy-check.{:016x}.tmp",
        fastrand::u64(..)
    ));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(io(place))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// In a shared directory, a file must belong to this process's user or to root.
fn check_owner(path: &Path) -> Result<(), CaError> {
    let owner = fs::metadata(path).map_err(io(path))?.uid();
    // The owner of /proc/self is this process's effective user.
    let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if owner == 0 || Some(owner) == me {
        Ok(())
    } else {
        Err(CaError::ForeignKey(path.to_owned()))
    }
}

/// Like [`place_new`], but over an existing file.
fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
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
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io(path))
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

    fn load(dir: &Path) -> Result<CertificateAuthority, CaError> {
        CertificateAuthority::load_or_create(dir, &CaPlan::default())
    }

    fn load_err(dir: &Path) -> String {
        load(dir).unwrap_err().to_string()
    }

    #[test]
    fn created_once_then_loaded() {
        let tmp = temp_dir();
        let dir = tmp.0.join("ca");
        let created = load(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&dir.join(KEY_FILE))), (0o700, 0o600));
        let pem = fs::read_to_string(dir.join(CERT_FILE)).unwrap();
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary files left"
        );
        let loaded = load(&dir).unwrap();
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
        load(&tmp.0).unwrap();
        for exposed in [0o644, 0o604, 0o620, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(exposed)).unwrap();
            assert!(load_err(&tmp.0).contains("run `chmod 600 /"), "{exposed:o}");
        }
        for tolerated in [0o400, 0o440, 0o640] {
            fs::set_permissions(&key, fs::Permissions::from_mode(tolerated)).unwrap();
            load(&tmp.0).unwrap();
        }
        let saved = fs::read(&key).unwrap();
        fs::remove_file(&key).unwrap();
        assert!(load_err(&tmp.0).contains("ca.key is missing"));
        fs::write(&key, saved).unwrap();
        fs::remove_file(&cert).unwrap();
        assert!(load_err(&tmp.0).contains("ca.pem is missing"));
    }

    #[test]
    fn a_directory_others_can_write_to_is_refused() {
        let tmp = temp_dir();
        load(&tmp.0).unwrap();
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            load_err(&tmp.0).contains("writable by other users"),
            "{}",
            load_err(&tmp.0)
        );
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o703)).unwrap();
        assert!(load_err(&tmp.0).contains("chmod o-w"));
        // Sticky, like a Secret volume: nobody can swap our files, so they load.
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o1777)).unwrap();
        load(&tmp.0).unwrap();
        let empty = tmp.0.join("empty");
        fs::create_dir(&empty).unwrap();
        fs::set_permissions(&empty, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            load(&empty).is_err(),
            "no CA is made where others could plant one"
        );
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_ca_made_before_constraints_is_loaded_as_it_is() {
        // A CA as earlier versions made it: no name constraint, ten years.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "line-retry-proxy intercept CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let tmp = temp_dir();
        fs::create_dir_all(&tmp.0).unwrap();
        place_new(&tmp.0.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600).unwrap();
        place_new(&tmp.0.join(CERT_FILE), cert.pem().as_bytes(), 0o644).unwrap();
        let before = (
            fs::read(tmp.0.join(CERT_FILE)).unwrap(),
            fs::read(tmp.0.join(KEY_FILE)).unwrap(),
        );
        let ca = load(&tmp.0).unwrap();
        assert!(!ca.is_constrained() && ca.permits("api.line.me"));
        let after = (
            fs::read(tmp.0.join(CERT_FILE)).unwrap(),
            fs::read(tmp.0.join(KEY_FILE)).unwrap(),
        );
        assert_eq!(before, after, "loaded, not rewritten");
    }

    #[test]
    fn renew_replaces_the_pair_and_keeps_the_old_certificate() {
        let tmp = temp_dir();
        let old = load(&tmp.0).unwrap();
        let plan = CaPlan {
            hosts: vec!["api.line.me".into(), "api-data.line.me".into()],
            ..CaPlan::default()
        };
        let (new, previous) = CertificateAuthority::renew(&tmp.0, &plan).unwrap();
        assert_eq!(previous.as_deref(), Some(old.cert_pem()));
        assert_ne!(new.cert_pem(), old.cert_pem());
        let loaded = load(&tmp.0).unwrap();
        assert_eq!(loaded.cert_pem(), new.cert_pem());
        assert!(loaded.permits("api-data.line.me"));
        assert_eq!(
            fs::read_to_string(tmp.0.join(PREVIOUS_CERT_FILE)).unwrap(),
            old.cert_pem()
        );
        assert_eq!(mode(&tmp.0.join(KEY_FILE)), 0o600);
        let names: Vec<_> = fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
