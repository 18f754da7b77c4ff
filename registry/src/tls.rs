//! TLS trust for every https client kiln has — registries, token servers,
//! `ADD https://…` and http(s) build contexts — from one function,
//! [`client_config`]. The roots it trusts, in order:
//!
//! 1. the Mozilla roots kiln carries (`webpki-roots`), so public hosts work
//!    on a machine without a CA bundle;
//! 2. the system store, as OpenSSL finds it: `SSL_CERT_FILE` (a PEM
//!    bundle) and `SSL_CERT_DIR` (directories of PEM files, `:`-separated)
//!    when either is set — they then replace the system locations, as they
//!    do for OpenSSL — else the first bundle of the usual locations
//!    (`/etc/ssl/certs/ca-certificates.crt` on Debian and Ubuntu, RHEL's,
//!    SUSE's, Alpine's; the list of the `openssl-probe` crate);
//! 3. kiln's per-host CAs, `certs.d/HOST[:PORT]/*.crt` in kiln's config
//!    directories (like Docker's `/etc/docker/certs.d`), for the host being
//!    contacted.
//!
//! git, which kiln runs for git sources, reads one CA file: [`pem_bundle`]
//! writes these roots (less the bundled ones) as one, for
//! `http.sslCAInfo`.
//!
//! Every file read is bounded ([`MAX_CA_FILE`] each, [`MAX_CA_DIR_FILES`]
//! files a directory); a file that is too large, not a regular file, or
//! named by `SSL_CERT_FILE`/certs.d but holding no certificate is a clear
//! error. A bad certificate inside the system bundle is skipped (one broken
//! entry must not stop every download); one in a file the user named is an
//! error.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use thiserror::Error;

use crate::config::RegistryConfig;

/// Largest CA file read (a whole distribution bundle is about 220 KB).
pub const MAX_CA_FILE: u64 = 16 << 20;
/// Most files read from one CA directory (`SSL_CERT_DIR`, a certs.d host).
pub const MAX_CA_DIR_FILES: usize = 10_000;

/// The OpenSSL variable naming a PEM bundle that replaces the system one.
pub const ENV_CERT_FILE: &str = "SSL_CERT_FILE";
/// The OpenSSL variable naming directories of PEM files (`:`-separated).
pub const ENV_CERT_DIR: &str = "SSL_CERT_DIR";

/// Why the trusted roots could not be put together.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A CA file or directory could not be read.
    #[error("CA certificates {}: {source}", .path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file is larger than [`MAX_CA_FILE`].
    #[error("CA certificates {}: larger than {} bytes", .path.display(), MAX_CA_FILE)]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A CA directory holds more than [`MAX_CA_DIR_FILES`] files.
    #[error("CA certificates {}: more than {} files", .path.display(), MAX_CA_DIR_FILES)]
    TooManyFiles {
        /// The directory.
        path: PathBuf,
    },
    /// Not a regular file (a FIFO, a device, a directory).
    #[error("CA certificates {}: not a regular file", .path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A file the user named holds a malformed certificate, or none.
    #[error("CA certificates {}: {detail}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// rustls refused the settings.
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Why [`read_regular_bounded`] read nothing.
#[derive(Debug)]
pub(crate) enum BoundedRead {
    /// Opening or reading failed (a missing file is `NotFound`).
    Io(std::io::Error),
    /// Not a regular file (a device, FIFO, socket or directory).
    NotAFile,
    /// Larger than the bound.
    TooLarge,
}

/// Reads `path` if it is a regular file of at most `max` bytes: opened
/// non-blocking (a FIFO never blocks) and checked before anything is read
/// (`/dev/zero` is refused, not read until memory runs out).
pub(crate) fn read_regular_bounded(path: &Path, max: u64) -> Result<Vec<u8>, BoundedRead> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(BoundedRead::Io)?;
    let meta = f.metadata().map_err(BoundedRead::Io)?;
    if !meta.is_file() {
        return Err(BoundedRead::NotAFile);
    }
    if meta.len() > max {
        return Err(BoundedRead::TooLarge);
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(BoundedRead::Io)?;
    if buf.len() as u64 > max {
        return Err(BoundedRead::TooLarge);
    }
    Ok(buf)
}

/// Reads a regular file of at most [`MAX_CA_FILE`] bytes
/// ([`read_regular_bounded`]).
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_regular_bounded(path, MAX_CA_FILE).map_err(|e| match e {
        BoundedRead::Io(source) => TlsError::Read {
            path: path.to_path_buf(),
            source,
        },
        BoundedRead::NotAFile => TlsError::NotAFile {
            path: path.to_path_buf(),
        },
        BoundedRead::TooLarge => TlsError::TooLarge {
            path: path.to_path_buf(),
        },
    })
}

/// How strictly a source is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strict {
    /// The system bundle: bad entries are skipped.
    Lenient,
    /// A file the user named: bad entries, or no certificate, are errors.
    Named,
}

/// The certificates of one PEM file.
fn pem_certs(path: &Path, strict: Strict) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(&bytes) {
        match c {
            Ok(c) => out.push(c),
            Err(e) if strict == Strict::Named => {
                return Err(TlsError::Invalid {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })
            }
            Err(_) => {}
        }
    }
    if out.is_empty() && strict == Strict::Named {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            detail: "no PEM certificate in file".into(),
        });
    }
    Ok(out)
}

/// The certificates of every PEM file in `dir` (as OpenSSL's hashed
/// directories, and Debian's `/etc/ssl/certs`: files without a certificate
/// — CRLs, READMEs — are passed over; a link to a file already read is read
/// once).
fn dir_certs(dir: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).map_err(read_err)? {
        let e = e.map_err(read_err)?;
        if names.len() >= MAX_CA_DIR_FILES {
            return Err(TlsError::TooManyFiles {
                path: dir.to_path_buf(),
            });
        }
        names.push(e.path());
    }
    names.sort();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in names {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => {
                if !seen.insert((m.dev(), m.ino())) {
                    continue;
                }
            }
            // Dangling links, subdirectories, sockets: not certificates.
            _ => continue,
        }
        out.extend(pem_certs(&p, Strict::Lenient)?);
    }
    Ok(out)
}

/// The system's trusted certificates: `SSL_CERT_FILE`/`SSL_CERT_DIR` when
/// either is set, else the first existing bundle of the usual locations.
pub fn system_certs() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let file = env(ENV_CERT_FILE).map(PathBuf::from);
    let dirs: Vec<PathBuf> = env(ENV_CERT_DIR)
        .map(|d| {
            std::env::split_paths(&d)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if file.is_none() && dirs.is_empty() {
        // No override: the bundle openssl-probe finds (it looked at the
        // variables too, and found them unset).
        return match openssl_probe::probe().cert_file {
            Some(f) => pem_certs(&f, Strict::Lenient),
            None => Ok(Vec::new()),
        };
    }
    let mut out = Vec::new();
    if let Some(f) = file {
        out.extend(pem_certs(&f, Strict::Named)?);
    }
    for d in dirs {
        out.extend(dir_certs(&d)?);
    }
    Ok(out)
}

/// The roots to trust when talking to `host` (`HOST[:PORT]`, the port
/// only when it is not the scheme's default): kiln's bundled roots, the
/// system store and the host's certs.d CAs.
pub fn root_store(cfg: &RegistryConfig, host: &str) -> Result<rustls::RootCertStore, TlsError> {
    roots_with(&cfg.ca_files(host))
}

/// [`root_store`] with the host's certs.d files already listed.
fn roots_with(ca_files: &[PathBuf]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A system certificate rustls cannot use (an old, odd encoding) is
    // passed over, as every TLS library does with its bundle. The same
    // certificate in the bundle and in a directory (`SSL_CERT_FILE` and
    // `SSL_CERT_DIR` both set, as often) is parsed once.
    let mut seen = std::collections::HashSet::new();
    let system: Vec<CertificateDer<'static>> = system_certs()?
        .into_iter()
        .filter(|c| seen.insert(c.as_ref().to_vec()))
        .collect();
    let (_added, _ignored) = roots.add_parsable_certificates(system);
    for f in ca_files {
        for c in pem_certs(f, Strict::Named)? {
            roots.add(c).map_err(|e| TlsError::Invalid {
                path: f.clone(),
                detail: e.to_string(),
            })?;
        }
    }
    Ok(roots)
}

/// A rustls client configuration (ring provider) trusting
/// [`root_store`]`(cfg, host)`.
///
/// Made once per process for each host, CA files and OpenSSL variables
/// (reading and parsing the system bundle took milliseconds, and a client
/// is made per registry contacted — per blob, through mirrors).
pub fn client_config(
    cfg: &RegistryConfig,
    host: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    // The CA files by name, size and change time: a file replaced is read
    // again.
    type Key = (
        Option<std::ffi::OsString>,
        Option<std::ffi::OsString>,
        String,
        Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    );
    static MADE: std::sync::Mutex<Vec<(Key, Arc<rustls::ClientConfig>)>> =
        std::sync::Mutex::new(Vec::new());
    let key: Key = (
        std::env::var_os(ENV_CERT_FILE),
        std::env::var_os(ENV_CERT_DIR),
        host.to_string(),
        cfg.ca_files(host)
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).ok();
                let len = m.as_ref().map_or(0, |m| m.len());
                (f, len, m.and_then(|m| m.modified().ok()))
            })
            .collect(),
    );
    if let Some(c) = MADE
        .lock()
        .ok()
        .and_then(|m| m.iter().find(|(k, _)| *k == key).map(|(_, c)| c.clone()))
    {
        return Ok(c);
    }
    let c = make_client_config(cfg, host)?;
    if let Ok(mut m) = MADE.lock() {
        // A handful of hosts in practice; bounded all the same.
        if m.len() < 256 {
            m.push((key, c.clone()));
        }
    }
    Ok(c)
}

fn make_client_config(
    cfg: &RegistryConfig,
    host: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(LazyRoots {
        ca_files: cfg.ca_files(host),
        provider: provider.clone(),
        inner: std::sync::OnceLock::new(),
    });
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(c))
}

/// rustls' own WebPKI verifier over [`root_store`], made when a server
/// first shows a certificate: the CA files are read and parsed then, not
/// when a client is made. A registry spoken to over plain HTTP (localhost,
/// `--insecure-registry`: kiln tries https first, and such a server
/// answers the hello with HTTP) never costs the system bundle — read and
/// parsed, it was a tenth of a cache import from a local registry. A CA
/// file that cannot be used fails the handshake with its own error.
#[derive(Debug)]
struct LazyRoots {
    ca_files: Vec<PathBuf>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    inner: std::sync::OnceLock<Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError>>,
}

impl LazyRoots {
    fn verifier(&self) -> Result<&Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        let made = self.inner.get_or_init(|| {
            let roots = roots_with(&self.ca_files)?;
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))
        });
        made.as_ref()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl rustls::client::danger::ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A PEM bundle for a client that reads one CA file (git's
/// `http.sslCAInfo`), when the defaults do not do: the system store (or
/// `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus `host`'s certs.d CAs. `None` when
/// neither variable is set and the host has no certs.d CAs: the client's
/// own default (the system bundle) is the same trust.
pub fn pem_bundle(cfg: &RegistryConfig, host: &str) -> Result<Option<Vec<u8>>, TlsError> {
    use base64::Engine as _;
    let overridden = [ENV_CERT_FILE, ENV_CERT_DIR]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    let host_files = cfg.ca_files(host);
    if !overridden && host_files.is_empty() {
        return Ok(None);
    }
    let mut certs = system_certs()?;
    for f in host_files {
        certs.extend(pem_certs(&f, Strict::Named)?);
    }
    let mut out = Vec::new();
    for c in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    Ok(Some(out))
}

/// The certs.d name of a URL's host: `HOST` for the scheme's default
/// port, else `HOST:PORT` (IPv6 hosts in brackets), as Docker names its
/// `certs.d` directories.
pub fn url_host(url: &url::Url) -> Option<String> {
    let h = url.host_str()?;
    Some(match url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    })
}

/// A hint for a TLS error text that says the server's certificate is not
/// trusted: where kiln looks for CAs.
pub fn untrusted_hint(detail: &str) -> Option<&'static str> {
    let d = detail.to_ascii_lowercase();
    (d.contains("unknownissuer") || d.contains("invalid peer certificate")).then_some(
        "the server's certificate is not signed by a trusted CA; kiln trusts the system store, \
         SSL_CERT_FILE and SSL_CERT_DIR, and certs.d/HOST[:PORT]/*.crt in its config directories",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_A_CERT: &str = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";

    #[test]
    fn named_file_without_a_certificate_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("empty.pem");
        std::fs::write(&f, "hello\n").unwrap();
        let e = pem_certs(&f, Strict::Named).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(pem_certs(&f, Strict::Lenient).unwrap().is_empty());
        std::fs::write(&f, NOT_A_CERT).unwrap();
        assert!(pem_certs(&f, Strict::Named).is_err());
    }

    #[test]
    fn oversized_ca_file_and_fifo_are_refused_without_reading_them() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big.pem");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_CA_FILE + 1).unwrap();
        let e = read_bounded(&big).unwrap_err();
        assert!(matches!(e, TlsError::TooLarge { .. }), "{e}");
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_bounded(&fifo).unwrap_err();
        assert!(matches!(e, TlsError::NotAFile { .. }), "{e}");
        let e = read_bounded(d.path()).unwrap_err();
        assert!(matches!(e, TlsError::NotAFile { .. }), "{e}");
    }

    #[test]
    fn url_host_names_the_port_only_when_not_the_default() {
        let u = |s: &str| url_host(&url::Url::parse(s).unwrap()).unwrap();
        assert_eq!(u("https://example.com/x"), "example.com");
        assert_eq!(u("https://example.com:443/x"), "example.com");
        assert_eq!(u("https://127.0.0.1:8443/x"), "127.0.0.1:8443");
        assert_eq!(u("https://[::1]:8443/x"), "[::1]:8443");
    }
}
