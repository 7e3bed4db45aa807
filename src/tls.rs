//! TLS for the links between datacenters (rustls, ring): an agent's listener with its
//! certificate re-read when its files change and, with a client CA, mutual TLS; and the client
//! side a `remote` datacenter uses (a private CA, a client certificate, a server name).
//! PEM files are read with errors that name the file and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

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

/// When the files were last changed, as far as a reload cares (each one's time and size).
fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

type Stamp = Option<Vec<(SystemTime, u64)>>;

/// Something made from files and made again when they change: new handshakes get the new
/// one, connections already open keep theirs. Files that do not load (half written, a key
/// that does not match) are logged and the one in use stays. A certificate and its key (a
/// listener's, or the client certificate a control plane presents to its agents), or a CA
/// that certificates are checked against.
struct Reloading<T> {
    /// What is reloaded, for the log ("TLS certificate", "client CA").
    what: &'static str,
    files: Vec<PathBuf>,
    make: fn(&[PathBuf]) -> anyhow::Result<T>,
    current: RwLock<Arc<T>>,
    seen: Mutex<Seen>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish()
    }
}

/// What a reload last saw of the files.
#[derive(Debug, Default)]
struct Seen {
    /// The files as last loaded.
    loaded: Stamp,
    /// The files as last refused, when, and why (logged once per reason).
    refused: Option<(Stamp, std::time::Instant, String)>,
}

impl<T> Reloading<T> {
    fn load(
        what: &'static str,
        files: &[&Path],
        make: fn(&[PathBuf]) -> anyhow::Result<T>,
    ) -> anyhow::Result<Reloading<T>> {
        let files: Vec<PathBuf> = files.iter().map(|f| f.to_path_buf()).collect();
        let loaded = stamp(&files);
        Ok(Reloading {
            what,
            current: RwLock::new(Arc::new(make(&files)?)),
            files,
            make,
            seen: Mutex::new(Seen {
                loaded,
                refused: None,
            }),
        })
    }

    /// [`Reloading::load`], then looked at every second while it lives.
    fn watched(
        what: &'static str,
        files: &[&Path],
        make: fn(&[PathBuf]) -> anyhow::Result<T>,
    ) -> anyhow::Result<Arc<Reloading<T>>>
    where
        T: Send + Sync + 'static,
    {
        let reloading = Arc::new(Reloading::load(what, files, make)?);
        spawn_reload(Arc::downgrade(&reloading));
        Ok(reloading)
    }

    fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files again if they changed since they were last looked at.
    fn refresh(&self) {
        let now = stamp(&self.files);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let refused_lately = seen
            .refused
            .as_ref()
            .is_some_and(|(stamp, at, _)| *stamp == now && at.elapsed() < RETRY_REFUSED);
        if now == seen.loaded || refused_lately {
            return;
        }
        match (self.make)(&self.files) {
            Ok(made) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(made);
                seen.loaded = now;
                seen.refused = None;
                tracing::info!(file = %self.files[0].display(), "{} reloaded", self.what);
            }
            Err(e) => {
                let why = format!("{e:#}");
                let new = seen
                    .refused
                    .as_ref()
                    .is_none_or(|(_, _, last)| *last != why);
                if new {
                    tracing::warn!(error = %why, "{} files changed but do not load; the previous one stays in use", self.what);
                }
                seen.refused = Some((now, std::time::Instant::now(), why));
            }
        }
    }
}

/// A certificate and its key from `files` ([certificate, key]).
fn load_pair(files: &[PathBuf]) -> anyhow::Result<CertifiedKey> {
    certified_key(&files[0], &files[1])
}

/// A certificate and its key, re-read when their files change.
fn reloading_pair(cert: &Path, key: &Path) -> anyhow::Result<Arc<Reloading<CertifiedKey>>> {
    crate::platform::isolation::warn_if_readable_by_others(key, "the TLS key file");
    Reloading::watched("TLS certificate", &[cert, key], load_pair)
}

impl ResolvesServerCert for Reloading<CertifiedKey> {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for Reloading<CertifiedKey> {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The signature checks a reloading verifier hands to the one in use (the same for a client's
/// and a server's certificate).
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.current().verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.current().verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.current().supported_verify_schemes()
        }
    };
}

/// The check of clients' certificates against the CA in `files` ([CA]).
fn load_client_verifier(files: &[PathBuf]) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let ca = &files[0];
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| anyhow!("{}: cannot verify clients with it: {e}", ca.display()))
}

/// Clients' certificates checked against a CA file re-read when it changes. It names no CA
/// to clients (the list would have to outlive a reload): a client presents its certificate
/// all the same.
impl ClientCertVerifier for Reloading<Arc<dyn ClientCertVerifier>> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    delegate_signatures!();
}

/// The check of a server's certificate against the CA in `files` ([CA]).
fn load_server_verifier(files: &[PathBuf]) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let ca = &files[0];
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| anyhow!("{}: cannot verify servers with it: {e}", ca.display()))
}

/// A server's certificate checked against a CA file re-read when it changes.
impl ServerCertVerifier for Reloading<Arc<WebPkiServerVerifier>> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    delegate_signatures!();
}

/// Looks at the files every second while the configuration using them lives (on the current
/// Tokio runtime; outside one, the files are read once).
fn spawn_reload<T: Send + Sync + 'static>(reloading: Weak<Reloading<T>>) {
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
    let resolver = reloading_pair(&tls.cert_file, &tls.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => builder.with_client_cert_verifier(Reloading::watched(
            "client CA",
            &[ca.as_path()],
            load_client_verifier,
        )?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.ca_file {
            // Re-read when it changes, as a listener's certificate is.
            Some(ca) => builder
                .dangerous()
                .with_custom_certificate_verifier(Reloading::watched(
                    "CA",
                    &[ca.as_path()],
                    load_server_verifier,
                )?),
            None => builder.with_root_certificates(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
        };
        let config = match (&self.cert_file, &self.key_file) {
            // Read now (a key that does not match is named at start), and again when the
            // files change, as a listener's certificate is.
            (Some(cert), Some(key)) => {
                builder.with_client_cert_resolver(reloading_pair(cert, key)?)
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

    fn in_use(r: &Reloading<CertifiedKey>) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    #[test]
    fn a_rotated_pair_is_taken_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (cert, key) = (d.join("tls.pem"), d.join("tls-key.pem"));
        let first = write_pair(d, "tls", "one.test");
        let r = Reloading::load("TLS certificate", &[&cert, &key], load_pair).unwrap();
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

    /// A CA and a certificate it signed for `name` (as a server and a client), as PEM and DER.
    fn ca_and_leaf(name: &str) -> (String, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), leaf.der().clone())
    }

    #[test]
    fn a_rotated_ca_is_taken_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        let (old_ca, _) = ca_and_leaf("agent.test");
        let (new_ca, leaf) = ca_and_leaf("agent.test");
        std::fs::write(&file, &old_ca).unwrap();
        let servers = Reloading::load("CA", &[&file], load_server_verifier).unwrap();
        let clients = Reloading::load("client CA", &[&file], load_client_verifier).unwrap();
        let name = ServerName::try_from("agent.test").unwrap();
        let now = UnixTime::now();
        let server_ok = || {
            servers
                .verify_server_cert(&leaf, &[], &name, &[], now)
                .is_ok()
        };
        let client_ok = || clients.verify_client_cert(&leaf, &[], now).is_ok();
        assert!(
            !server_ok() && !client_ok(),
            "signed by a CA not trusted yet"
        );
        // The new CA added beside the old one, as a rotation does, a second later.
        std::thread::sleep(Duration::from_millis(1100));
        let staged = dir.path().join("ca.pem.new");
        std::fs::write(&staged, format!("{old_ca}{new_ca}")).unwrap();
        std::fs::rename(&staged, &file).unwrap();
        servers.refresh();
        clients.refresh();
        assert!(server_ok() && client_ok(), "the rotated CA is taken");
        // A broken file leaves the CA in use.
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::write(&file, "half a certificate").unwrap();
        servers.refresh();
        assert!(server_ok(), "a file that does not load is refused");
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
