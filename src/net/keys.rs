//! Node identity: a long-lived key pair and a self-signed certificate, known to other nodes by
//! its [`Fingerprint`] (SHA-256 of the certificate DER).
//!
//! `ferry keygen` writes `DIR/node.key` (PKCS#8 PEM, mode 0600) and `DIR/node.crt` (PEM); the
//! other nodes pin the fingerprint in their config. Trust comes only from that pin: the
//! certificate's names, issuer and validity dates are never checked (see `tls.rs`).

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::durable;

/// File name of the node's private key inside the key directory.
pub const KEY_FILE: &str = "node.key";
/// File name of the node's certificate inside the key directory.
pub const CERT_FILE: &str = "node.crt";
/// The subject alternative name (and common name) of every node certificate. Peers are told
/// apart by fingerprint, never by name.
pub const CERT_NAME: &str = "ferry-node";

/// Permission bits of a new key file.
const KEY_MODE: u32 = 0o600;
/// Permission bits of a new certificate file (public).
const CERT_MODE: u32 = 0o644;
/// Permission bits of a key directory that `keygen` creates.
const DIR_MODE: u32 = 0o700;

/// The SHA-256 of a node certificate's DER: how nodes name and trust each other.
///
/// Printed as 64 lowercase hex digits. Parsing also accepts uppercase and the colon-separated
/// form (`AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints it), and ignores
/// surrounding whitespace.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a certificate, given its DER bytes.
    pub fn of_cert(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        Fingerprint(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A string that is not a certificate fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fingerprint {input:?}: fingerprint must be 64 hex digits (SHA-256 of the peer's \
     node.crt, as `ferry id` prints it)"
)]
pub struct ParseFingerprintError {
    /// The rejected text (cut to 100 characters).
    pub input: String,
}

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Fingerprint, ParseFingerprintError> {
        let err = || ParseFingerprintError {
            input: s.chars().take(100).collect(),
        };
        let t = s.trim().as_bytes();
        // Either 64 hex digits, or 32 pairs separated by single colons.
        let digits: Vec<u8> = match t.len() {
            64 => t.to_vec(),
            95 if t.iter().skip(2).step_by(3).all(|&c| c == b':') => {
                t.chunks(3).flat_map(|c| [c[0], c[1]]).collect::<Vec<u8>>()
            }
            _ => return Err(err()),
        };
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            *o = (hex(pair[0]).ok_or_else(err)? << 4) | hex(pair[1]).ok_or_else(err)?;
        }
        Ok(Fingerprint(out))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node identity that cannot be created or loaded. Each variant names the file and says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key directory could not be created.
    #[error("cannot create key directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    /// `keygen` found a key or certificate already there.
    #[error(
        "{path} already exists: refusing to overwrite this node's identity (peers that pinned \
         its fingerprint would refuse a new one); use `ferry id` to print the existing \
         fingerprint, or move the old files away first if you really want a new identity"
    )]
    AlreadyExists { path: PathBuf },
    /// The key pair or certificate could not be generated.
    #[error("cannot generate a node key and certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a new key or certificate failed.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// The key or certificate file does not exist.
    #[error("{path} does not exist: run `ferry keygen --dir {}` to create this node's identity", dir.display())]
    Missing { path: PathBuf, dir: PathBuf },
    /// Reading the key or certificate (or its metadata) failed.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The key file is readable or writable by group or others.
    #[error(
        "private key {path} has mode {mode:04o}, open to group or others: ferry refuses to use \
         it; run `chmod 600 {}` (and consider making a new key if others may have read it)",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The key file holds no usable private key.
    #[error("{path} is not a PEM private key ferry can use: {reason}")]
    BadKey { path: PathBuf, reason: String },
    /// The certificate file holds no certificate.
    #[error("{path} is not a PEM certificate: {reason}")]
    BadCert { path: PathBuf, reason: String },
    /// Key and certificate are not a pair.
    #[error(
        "private key {key} does not belong to certificate {cert}: restore the matching pair \
         (the fingerprint the peers pinned is the certificate's)"
    )]
    Mismatch { key: PathBuf, cert: PathBuf },
}

/// This node's key pair and certificate, loaded and checked.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads `DIR/node.key` and `DIR/node.crt` and checks them: the key must not be open to
    /// group or others, must parse, and must be the certificate's key.
    pub fn load(dir: &Path) -> Result<Identity, KeyError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        // Check the mode of the file we read, not of whatever the path names a moment later.
        let mut file = fs::File::open(&key_path).map_err(|e| read_error(&key_path, dir, e))?;
        let meta = file.metadata().map_err(|e| read_error(&key_path, dir, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: key_path,
                mode,
            });
        }
        let mut key_pem = Vec::new();
        file.read_to_end(&mut key_pem)
            .map_err(|e| read_error(&key_path, dir, e))?;
        let cert = read_cert(&cert_path, dir)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| KeyError::BadKey {
            path: key_path.clone(),
            reason: pem_reason(e),
        })?;
        let identity = Identity::from_der(cert, key).map_err(|e| match e {
            PairError::Key(reason) => KeyError::BadKey {
                path: key_path.clone(),
                reason,
            },
            PairError::Cert(reason) => KeyError::BadCert {
                path: cert_path.clone(),
                reason,
            },
            PairError::Mismatch => KeyError::Mismatch {
                key: key_path.clone(),
                cert: cert_path.clone(),
            },
        })?;
        log::debug!(
            "loaded node identity {} from {}",
            identity.fingerprint,
            dir.display()
        );
        Ok(identity)
    }

    /// A fresh identity held only in memory (tests, and ephemeral nodes).
    pub fn generate() -> Result<Identity, KeyError> {
        let (key_pem, cert_pem) = generate_pem()?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("rcgen emits PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("rcgen emits PEM");
        Ok(Identity::from_der(cert, key).expect("rcgen emits a matching pair"))
    }

    fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, PairError> {
        let provider = super::tls::provider();
        let signer = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| PairError::Key(e.to_string()))?;
        let certified = rustls::sign::CertifiedKey::new(vec![cert.clone()], signer);
        match certified.keys_match() {
            // A key type whose public half the provider cannot derive is let through: the
            // handshake signature then proves the pair to the peer anyway.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => return Err(PairError::Mismatch),
            Err(e) => return Err(PairError::Cert(e.to_string())),
        }
        Ok(Identity {
            fingerprint: Fingerprint::of_cert(&cert),
            cert,
            key,
        })
    }

    /// The certificate (DER) this node presents.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key (DER), for building TLS configurations.
    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The fingerprint other nodes pin for this one.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// Why a DER key and certificate do not make an identity (mapped to [`KeyError`] with paths).
#[derive(Debug)]
enum PairError {
    Key(String),
    Cert(String),
    Mismatch,
}

/// Creates this node's identity in `dir`: a new ECDSA P-256 key pair and a self-signed
/// certificate for [`CERT_NAME`], written as `dir/node.key` (mode 0600) and `dir/node.crt`.
/// Creates `dir` (mode 0700) if needed. Never overwrites: if either file exists, nothing is
/// written. Returns the fingerprint to pin on the other nodes.
pub fn keygen(dir: &Path) -> Result<Fingerprint, KeyError> {
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| KeyError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    for path in [&key_path, &cert_path] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::AlreadyExists { path: path.clone() });
        }
    }
    let (key_pem, cert_pem) = generate_pem()?;
    // Key first: a crash between the two leaves a key without a certificate, which `load`
    // reports, rather than a certificate whose key is lost.
    write_new(&key_path, key_pem.as_bytes(), KEY_MODE)?;
    write_new(&cert_path, cert_pem.as_bytes(), CERT_MODE)?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("rcgen emits PEM");
    let fp = Fingerprint::of_cert(&der);
    log::info!(
        "created node identity {fp} in {} ({KEY_FILE}, {CERT_FILE})",
        dir.display()
    );
    Ok(fp)
}

/// The fingerprint of the certificate in `dir`, reading only the (public) certificate.
pub fn fingerprint_in(dir: &Path) -> Result<Fingerprint, KeyError> {
    let cert = read_cert(&dir.join(CERT_FILE), dir)?;
    Ok(Fingerprint::of_cert(&cert))
}

/// A new key pair and self-signed certificate, as (key PEM, certificate PEM).
fn generate_pem() -> Result<(String, String), KeyError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![CERT_NAME.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CERT_NAME);
    // rcgen's defaults are already "forever" (1975 to 4096); say so explicitly, since peers
    // never check validity and a node identity must not expire under a running cluster.
    params.not_before = rcgen::date_time_ymd(1975, 1, 1);
    params.not_after = rcgen::date_time_ymd(4096, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok((key.serialize_pem(), cert.pem()))
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    durable::write_new(path, data, mode).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn read_cert(path: &Path, dir: &Path) -> Result<CertificateDer<'static>, KeyError> {
    let pem = fs::read(path).map_err(|e| read_error(path, dir, e))?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| KeyError::BadCert {
        path: path.to_path_buf(),
        reason: pem_reason(e),
    })
}

fn read_error(path: &Path, dir: &Path, source: io::Error) -> KeyError {
    if source.kind() == io::ErrorKind::NotFound {
        KeyError::Missing {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        }
    } else {
        KeyError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM block of that kind found".into(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff0123456789abcdef0f1e2d3c4b5a6978";

    #[test]
    fn fingerprint_prints_and_parses_64_lowercase_hex() {
        let fp: Fingerprint = HEX.parse().unwrap();
        assert_eq!(fp.to_string(), HEX);
        assert_eq!(fp.as_bytes()[..3], [0x00, 0x11, 0x22]);
        assert_eq!(fp.as_bytes()[31], 0x78);
        assert_eq!(format!("{fp:?}"), format!("Fingerprint({HEX})"));
    }

    #[test]
    fn fingerprint_accepts_uppercase_colons_and_surrounding_space() {
        let fp: Fingerprint = HEX.parse().unwrap();
        assert_eq!(HEX.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        let colons = HEX
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("  {HEX}\n").parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn fingerprint_rejects_everything_else_with_a_clear_message() {
        let bad = [
            String::new(),
            HEX[..63].to_string(),
            format!("{HEX}0"),
            format!("{}g", &HEX[..63]),
            format!("{}+1", &HEX[..62]),
            format!("sha256:{HEX}"),
            // Colons in the wrong places, or a colon form that is too short.
            format!("{}:{}", &HEX[..32], &HEX[32..]),
            HEX.as_bytes()[..62]
                .chunks(2)
                .map(|p| std::str::from_utf8(p).unwrap())
                .collect::<Vec<_>>()
                .join(":"),
            "é".repeat(32),
        ];
        for s in bad {
            let e = s.parse::<Fingerprint>().unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("fingerprint must be 64 hex digits (SHA-256 of the peer's node.crt, as `ferry id` prints it)"),
                "{msg}"
            );
        }
    }

    #[test]
    fn fingerprint_serialises_as_its_string() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Peer {
            fingerprint: Fingerprint,
        }
        let p = Peer {
            fingerprint: HEX.parse().unwrap(),
        };
        let text = toml::to_string(&p).unwrap();
        assert_eq!(text.trim(), format!("fingerprint = \"{HEX}\""));
        assert_eq!(toml::from_str::<Peer>(&text).unwrap(), p);
        let e = toml::from_str::<Peer>("fingerprint = \"abc\"").unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Peer>(&json).unwrap(), p);
    }

    #[test]
    fn keygen_writes_a_private_key_and_a_certificate_that_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let fp = keygen(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o644);
        // Only the two files: no temporary file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);

        let id = Identity::load(&dir).unwrap();
        assert_eq!(id.fingerprint(), fp);
        assert_eq!(Fingerprint::of_cert(id.cert_der()), fp);
        assert_eq!(fingerprint_in(&dir).unwrap(), fp);
        assert!(!format!("{id:?}").contains("PRIVATE"));

        // A second node gets a different identity.
        assert_ne!(keygen(&tmp.path().join("other")).unwrap(), fp);
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let fp = keygen(dir).unwrap();
        let key_before = fs::read(dir.join(KEY_FILE)).unwrap();
        let e = keygen(dir).unwrap_err();
        assert!(matches!(e, KeyError::AlreadyExists { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.join(KEY_FILE).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("refusing to overwrite"), "{msg}");
        assert_eq!(fs::read(dir.join(KEY_FILE)).unwrap(), key_before);
        assert_eq!(Identity::load(dir).unwrap().fingerprint(), fp);

        // A certificate alone is not overwritten either.
        let other = tmp.path().join("other");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(CERT_FILE), "x").unwrap();
        let e = keygen(&other).unwrap_err();
        assert!(e.to_string().contains(CERT_FILE), "{e}");
        assert!(!other.join(KEY_FILE).exists());
    }

    #[test]
    fn a_key_open_to_group_or_others_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        keygen(dir).unwrap();
        let key = dir.join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let e = Identity::load(dir).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, KeyError::Permissions { .. }), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", key.display())),
                "{msg}"
            );
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            Identity::load(dir).unwrap();
        }
    }

    #[test]
    fn a_missing_identity_says_to_run_keygen() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Identity::load(tmp.path()).unwrap_err();
        assert!(matches!(e, KeyError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("ferry keygen --dir"), "{e}");
        let e = fingerprint_in(tmp.path()).unwrap_err();
        assert!(e.to_string().contains(CERT_FILE), "{e}");
    }

    #[test]
    fn a_key_from_another_identity_is_a_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        keygen(&a).unwrap();
        keygen(&b).unwrap();
        fs::remove_file(a.join(CERT_FILE)).unwrap();
        fs::copy(b.join(CERT_FILE), a.join(CERT_FILE)).unwrap();
        let e = Identity::load(&a).unwrap_err();
        assert!(matches!(e, KeyError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not belong"), "{e}");
    }

    #[test]
    fn garbage_files_are_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        keygen(dir).unwrap();
        fs::write(dir.join(CERT_FILE), "not a certificate").unwrap();
        let e = Identity::load(dir).unwrap_err();
        assert!(matches!(e, KeyError::BadCert { .. }), "{e}");
        assert!(e.to_string().contains(CERT_FILE), "{e}");

        let other = dir.join("o");
        keygen(&other).unwrap();
        let key = other.join(KEY_FILE);
        fs::remove_file(&key).unwrap();
        durable::write_new(&key, b"-----BEGIN NOTHING-----\n", 0o600).unwrap();
        let e = Identity::load(&other).unwrap_err();
        assert!(matches!(e, KeyError::BadKey { .. }), "{e}");
        assert!(e.to_string().contains(KEY_FILE), "{e}");
    }
}
