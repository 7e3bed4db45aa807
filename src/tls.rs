//! TLS for the links between datacenters (rustls, ring): an agent's listener with its
//! certificate re-read when its files change and, with a client CA, mutual TLS; and the client
//! side a `remote` datacenter uses (a private CA, a client certificate, a server name).
//! PEM files are read with errors that name the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

/// How often a listener's certificate files are looked at for a change.
const RELOAD_CHECK: Duration = Duration::from_secs(1);
/// How often a pair that did not load is tried again though its files look the same (a
/// permission fixed changes neither their time nor their size).
const RETRY_REFUSED: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// The certificates of a PEM file, in order (a chain: the end entity first).
pub fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, "certificate file")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{}: holds no certificate (a PEM \"CERTIFICATE\" block)",
            path.display()
        );
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key file")?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow!("{}: holds no PEM private key: {e}", path.display()))
}

/// The CAs of a PEM file, as roots to verify the other side against.
pub fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to go together.
fn certified_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = certificates(cert)?;
    let key_der = private_key(key)?;
    CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| anyhow!("{} does not go with {}: {e}", key.display(), cert.display()))
}

/// When the files were last changed, as far as a reload cares.
fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, u64, SystemTime, u64)> {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

/// A certificate and key, re-read when their files change: new handshakes get the new pair,
/// connections already open keep theirs. A pair that does not load (half written, not
/// matching) is logged and the one in use stays. A listener's certificate, or the client
/// certificate a control plane presents to its agents.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    seen: Mutex<Seen>,
}

/// What a reload last saw of the files.
#[derive(Debug, Default)]
struct Seen {
    /// The files as last loaded.
    loaded: Stamp,
    /// The files as last refused, when, and why (logged once per reason).
    refused: Option<(Stamp, std::time::Instant, String)>,
}

impl Reloading {
    fn load(cert: &Path, key: &Path) -> anyhow::Result<Reloading> {
        crate::platform::isolation::warn_if_readable_by_others(key, "the TLS key file");
        let loaded = stamp(cert, key);
        Ok(Reloading {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(certified_key(cert, key)?)),
            seen: Mutex::new(Seen {
                loaded,
                refused: None,
            }),
        })
    }

    /// Loads the files again if they changed since they were last looked at.
    fn refresh(&self) {
        let now = stamp(&self.cert, &self.key);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let refused_lately = seen
            .refused
            .as_ref()
            .is_some_and(|(stamp, at, _)| *stamp == now && at.elapsed() < RETRY_REFUSED);
        if now == seen.loaded || refused_lately {
            return;
        }
        match certified_key(&self.cert, &self.key) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                seen.loaded = now;
                seen.refused = None;
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                let why = format!("{e:#}");
                let new = seen
                    .refused
                    .as_ref()
                    .is_none_or(|(_, _, last)| *last != why);
                if new {
                    tracing::warn!(error = %why, "TLS certificate files changed but do not load; the previous certificate stays in use");
                }
                seen.refused = Some((now, std::time::Instant::now(), why));
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl ResolvesClientCert for Reloading {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Looks at the files every second while the configuration using them lives (on the current
/// Tokio runtime; outside one, the files are read once).
fn spawn_reload(reloading: Weak<Reloading>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(r) = reloading.upgrade() else { return };
            tokio::task::spawn_blocking(move || r.refresh()).await.ok();
        }
    });
}

/// A listener's TLS: its certificate and key, and the CA its clients' certificates must be
/// signed by (mutual TLS) if any.
#[derive(Debug, Clone, Default)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The server side of a listener: TLS 1.2 and 1.3, HTTP/2 or HTTP/1.1 by ALPN (a client that
/// offers neither speaks HTTP/1.1), the certificate re-read when its files change (must run on
/// a Tokio runtime).
pub fn acceptor(tls: &ListenerTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let resolver = Arc::new(Reloading::load(&tls.cert_file, &tls.key_file)?);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| anyhow!("{}: cannot verify clients with it: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    spawn_reload(Arc::downgrade(&resolver));
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What a client trusts and presents: the CA the server's certificate must be signed by
/// (else the bundled public roots), its own certificate and key (mutual TLS), and the name
/// the server's certificate must carry (else the URL's host).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The rustls configuration (no ALPN: HTTP/1.1).
    pub fn config(&self) -> anyhow::Result<ClientConfig> {
        let roots = match &self.ca_file {
            Some(ca) => roots(ca)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            // Read now (a key that does not match is named at start), and again when the
            // files change, as a listener's certificate is.
            (Some(cert), Some(key)) => {
                let resolver = Arc::new(Reloading::load(cert, key)?);
                spawn_reload(Arc::downgrade(&resolver));
                builder.with_client_cert_resolver(resolver)
            }
            (None, None) => builder.with_no_client_auth(),
            _ => bail!("cert_file and key_file go together"),
        };
        Ok(config)
    }

    /// The name the server's certificate is checked against, for a URL's `host`.
    pub fn name_for(&self, host: &str) -> anyhow::Result<ServerName<'static>> {
        let (name, from) = match &self.server_name {
            Some(name) => (name.as_str(), "server_name"),
            None => (host, "the URL's host"),
        };
        ServerName::try_from(name.to_string())
            .map_err(|e| anyhow!("{from}: {name:?} is not a DNS name or an IP address: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a self-signed certificate for `name` and its key as `stem.pem`/`stem-key.pem`
    /// (through a rename, as a rotation does); the certificate's DER.
    fn write_pair(dir: &Path, stem: &str, name: &str) -> Vec<u8> {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        for (file, text) in [
            (format!("{stem}.pem"), made.cert.pem()),
            (format!("{stem}-key.pem"), made.key_pair.serialize_pem()),
        ] {
            let staged = dir.join(format!("{file}.new"));
            std::fs::write(&staged, text).unwrap();
            std::fs::rename(&staged, dir.join(file)).unwrap();
        }
        made.cert.der().to_vec()
    }

    fn in_use(r: &Reloading) -> Vec<u8> {
        r.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn a_rotated_pair_is_taken_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cert, key) = (d.join("tls.pem"), d.join("tls-key.pem"));
        let first = write_pair(d, "tls", "one.test");
        let r = Reloading::load(&cert, &key).unwrap();
        assert_eq!(in_use(&r), first);
        r.refresh();
        assert_eq!(in_use(&r), first, "nothing changed, nothing reloaded");
        // Files a second apart in time, as the check every second sees them.
        std::thread::sleep(Duration::from_millis(1100));
        let second = write_pair(d, "tls", "two.test");
        r.refresh();
        assert_eq!(in_use(&r), second, "a rotated pair is taken");
        // A certificate whose key has not been written yet: the pair in use stays.
        std::thread::sleep(Duration::from_millis(1100));
        write_pair(d, "other", "three.test");
        std::fs::copy(d.join("other.pem"), &cert).unwrap();
        r.refresh();
        assert_eq!(in_use(&r), second, "a pair that does not match is refused");
        assert!(r.seen.lock().unwrap().refused.is_some());
        // The key arrives: the new pair is taken.
        std::fs::copy(d.join("other-key.pem"), &key).unwrap();
        r.refresh();
        assert_ne!(in_use(&r), second, "the completed pair is taken");
        assert!(r.seen.lock().unwrap().refused.is_none());
    }

    #[test]
    fn files_that_are_not_there_or_not_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = certificates(&missing).unwrap_err().to_string();
        assert!(
            e.contains("cannot read the certificate file") && e.contains("missing.pem"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = certificates(&junk).unwrap_err().to_string();
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = private_key(&junk).unwrap_err().to_string();
        assert!(
            e.contains("junk.pem") && e.contains("no PEM private key"),
            "{e}"
        );
        let tls = ClientTls {
            cert_file: Some(junk),
            ..Default::default()
        };
        let e = tls.config().unwrap_err().to_string();
        assert!(e.contains("cert_file and key_file go together"), "{e}");
    }
}
