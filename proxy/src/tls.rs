//! TLS by rustls: the client-facing certificate, swapped in place on reload, and the checks
//! that turn a bad certificate, key or CA file into a config error naming the key.
//!
//! The TLS listener serves its certificate through [`CertStore`], a rustls certificate
//! resolver holding the current certificate and key. A reload re-reads both files (a renewed
//! certificate is picked up without a restart or an upgrade); new handshakes get the new
//! certificate, established connections keep theirs. A file that does not load leaves the
//! current certificate in force.
//!
//! This module knows nothing of the configuration: it takes file paths and reports a bad file
//! as a [`FileError`] (the key, the value and the fix, as the configuration words them), which
//! the configuration turns into its own error.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};

/// A certificate, key or CA file that cannot be used: which key names it, the value as
/// written, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// The configuration key naming the file (`tls.cert`, `tls.key`, `upstream.ca_file`).
    pub key: String,
    /// The path, quoted.
    pub value: String,
    /// What is wrong and how to fix it.
    pub fix: String,
}

impl FileError {
    fn new(key: &str, value: impl Into<String>, fix: impl Into<String>) -> Self {
        FileError {
            key: key.into(),
            value: value.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{} = {}`: {}", self.key, self.value, self.fix)
    }
}

impl std::error::Error for FileError {}

/// The certificate the TLS listener presents; replaced whole on reload.
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl CertStore {
    /// A store presenting `key`.
    pub fn new(key: CertifiedKey) -> Self {
        CertStore {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Present `key` from the next handshake on.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .map(|k| k.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn provider() -> &'static Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    // Installed just above (or earlier, by us or pingora): always present.
    #[allow(clippy::expect_used)]
    CryptoProvider::get_default().expect("a rustls crypto provider is installed")
}

/// Largest certificate, key or CA file read, bytes: a path to a device or a huge file is an
/// error, not a hang.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

fn read(key: &str, path: &Path) -> Result<String, FileError> {
    use std::io::Read;
    let value = || format!("{:?}", path.display().to_string());
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| {
            FileError::new(
                key,
                value(),
                format!("cannot read the file ({e}); give the path of a readable PEM file"),
            )
        })?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(FileError::new(
            key,
            value(),
            "is larger than 1 MiB; give the path of a PEM file",
        ));
    }
    Ok(text)
}

/// Load a certificate chain and its private key (PEM files) and check that they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, FileError> {
    let cert_text = read("tls.cert", cert)?;
    read("tls.key", key)?;
    let cert_value = format!("{:?}", cert.display().to_string());
    let key_value = format!("{:?}", key.display().to_string());
    let loaded = pingora::tls::load_certs_and_key_files(
        &cert.display().to_string(),
        &key.display().to_string(),
    )
    .map_err(|e| {
        FileError::new(
            "tls.cert",
            cert_value.clone(),
            format!("cannot be parsed as PEM ({e})"),
        )
    })?;
    let Some((certs, private_key)) = loaded else {
        return Err(if !cert_text.contains("-----BEGIN CERTIFICATE-----") {
            FileError::new(
                "tls.cert",
                cert_value,
                "holds no PEM certificate; give the certificate chain, server certificate first",
            )
        } else {
            FileError::new(
                "tls.key",
                key_value,
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1); give the certificate's key",
            )
        });
    };
    CertifiedKey::from_der(certs, private_key, provider()).map_err(|e| {
        FileError::new(
            "tls.key",
            key_value,
            format!("does not go with the certificate in tls.cert ({e}); give the matching key"),
        )
    })
}

/// Check that a CA bundle holds at least one PEM certificate; returns its path.
pub fn check_ca_file(key: &str, path: &str) -> Result<String, FileError> {
    let text = read(key, Path::new(path))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(FileError::new(
            key,
            format!("{path:?}"),
            "holds no PEM certificate; give a file of CA certificates",
        ));
    }
    Ok(path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn bad_files_name_the_key_and_the_fix() {
        let missing = Path::new("/nonexistent/sluice/cert.pem");
        let e = load_certified_key(missing, missing).expect_err("missing file");
        assert_eq!(e.key, "tls.cert");
        assert!(e.fix.contains("cannot read"), "{e}");

        let not_pem = temp("not.pem", "hello\n");
        let e = load_certified_key(&not_pem, &not_pem).expect_err("not PEM");
        assert_eq!(e.key, "tls.cert");
        assert!(e.fix.contains("no PEM certificate"), "{e}");

        let e = check_ca_file("upstream.ca_file", &not_pem.display().to_string())
            .expect_err("not a CA bundle");
        assert_eq!(e.key, "upstream.ca_file");

        let e = check_ca_file("upstream.ca_file", "/dev/zero").expect_err("endless");
        assert!(
            e.fix.contains("1 MiB") || e.fix.contains("cannot read"),
            "{e}"
        );
    }
}
