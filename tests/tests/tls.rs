//! End-to-end: TLS. The client-facing TLS listener serves kept-alive connections under the same
//! cap as plain ones and picks up a renewed certificate on reload (a bad file leaves the
//! current one in force); TLS toward a backend is verified against the configured CA.
//! Certificates are made fresh for each run (rcgen): a CA and a leaf for localhost/127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::start;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sluice::run::{free_local_addr, RunningProxy};
use sluice::{Config, Overrides};
use sluice_tests::emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// A test CA that issues leaf certificates for localhost and 127.0.0.1.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_der: Vec<u8>,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA cert");
        Pki {
            ca_der: cert.der().to_vec(),
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A new leaf: (certificate DER, certificate PEM, key PEM).
    fn leaf(&self) -> (Vec<u8>, String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.der().to_vec(), cert.pem(), key.serialize_pem())
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .expect("CA root");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(pki: &Pki, addr: std::net::SocketAddr) -> Tls {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(Duration::from_secs(5), pki.connector().connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// The server certificate a TLS connection got.
fn presented(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// One GET on a TLS connection: (status, X-Txn-Id).
async fn get(s: &mut Tls, id: &str) -> (u16, Option<String>) {
    let req = format!("GET /pay HTTP/1.1\r\nHost: localhost\r\nX-Txn-Id: {id}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0);
                let txn = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-txn-id"))
                    .map(|h| String::from_utf8_lossy(h.value).to_string());
                let status = resp.code.unwrap_or(0);
                let chunked = resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                });
                // The emulator answers by Content-Length or chunked (no trailers).
                let end = if chunked {
                    chunked_end(&buf[head..]).map(|n| head + n)
                } else {
                    (buf.len() >= head + len).then_some(head + len)
                };
                if let Some(end) = end {
                    buf.drain(..end);
                    return (status, txn);
                }
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before a whole response");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response in time")
}

/// The length of a complete chunked body (without trailers) at the start of `body`, if it is all
/// there.
fn chunked_end(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    // Each pass consumes one chunk; bounded by the body's length.
    for _ in 0..=body.len() {
        let line_end = at + body.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[at..line_end]).ok()?.trim(), 16)
            .ok()?;
        at = line_end + 2;
        if size == 0 {
            return (body.len() >= at + 2).then_some(at + 2);
        }
        at += size + 2;
        if body.len() < at {
            return None;
        }
    }
    None
}

/// A sluice with a TLS listener in front of `backend`, from a file (so it can reload).
fn tls_proxy(
    backend: std::net::SocketAddr,
    cap: u32,
    d: &Path,
) -> (RunningProxy, std::net::SocketAddr) {
    let tls_addr = free_local_addr().expect("port");
    let path = d.join("sluice.toml");
    write(
        &path,
        &format!(
            "[admission]\nmax_inflight = {cap}\n[slow_start]\nduration = \"0s\"\n\
             [health]\ncheck = \"none\"\n[log]\naccess = \"off\"\n\
             [tls]\nlisten = \"{tls_addr}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [[backend]]\naddress = \"{backend}\"\n",
            d.join("cert.pem").display(),
            d.join("key.pem").display()
        ),
    );
    let overrides = Overrides {
        listen: Some(free_local_addr().expect("port").to_string()),
        admin_listen: Some(String::new()),
        ..Overrides::default()
    };
    let cfg = Config::load(&path, &overrides).expect("valid TLS config");
    let proxy = RunningProxy::start_from(&cfg, Some(path), overrides).expect("start");
    (proxy, tls_addr)
}

/// TLS clients are served on kept-alive connections, under the same cap as plain clients; a
/// reload picks up a renewed certificate for new handshakes; a broken certificate file is
/// refused by the reload and the current certificate stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_keeps_the_cap_and_picks_up_a_renewed_certificate() {
    let emu = Emulator::start(EmulatorConfig {
        workers: 256,
        service_time: Duration::from_millis(30),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let pki = Pki::new();
    let d = dir("listener");
    let (first_der, cert, key) = pki.leaf();
    write(&d.join("cert.pem"), &cert);
    write(&d.join("key.pem"), &key);
    let (proxy, tls_addr) = tls_proxy(emu.addr(), 4, &d);

    // One kept-alive TLS connection, three requests.
    let mut kept = tls_connect(&pki, tls_addr).await;
    assert_eq!(presented(&kept), first_der);
    for i in 0..3 {
        let id = format!("tls-ka-{i}");
        assert_eq!(get(&mut kept, &id).await, (200, Some(id.clone())));
    }

    // 24 TLS clients at once against a cap of 4.
    emu.reset_stats();
    let clients: Vec<_> = (0..24)
        .map(|i| {
            let connector = pki.connector();
            tokio::spawn(async move {
                let tcp = TcpStream::connect(tls_addr).await.expect("connect");
                let name = ServerName::try_from("localhost").expect("name");
                let mut s = connector.connect(name, tcp).await.expect("handshake");
                let id = format!("tls-{i}");
                (get(&mut s, &id).await, id)
            })
        })
        .collect();
    for c in clients {
        let ((status, txn), id) = c.await.expect("client");
        assert_eq!((status, txn), (200, Some(id)));
    }
    assert_eq!(
        emu.stats().max_inside,
        4,
        "TLS clients are admitted under the cap"
    );

    // Renewed certificate, same paths: new handshakes get it after a reload.
    let (second_der, cert, key) = pki.leaf();
    write(&d.join("cert.pem"), &cert);
    write(&d.join("key.pem"), &key);
    let report = sluice::ops::reload::reload(proxy.shared()).expect("reload");
    assert!(
        report.applied.iter().any(|a| a.contains("TLS certificate")),
        "{report:?}"
    );
    let mut renewed = tls_connect(&pki, tls_addr).await;
    assert_eq!(presented(&renewed), second_der);
    assert_eq!(get(&mut renewed, "after-renewal").await.0, 200);
    // The established connection keeps working.
    assert_eq!(get(&mut kept, "kept").await.0, 200);

    // A broken certificate file: the reload is refused, naming the key; TLS goes on.
    write(&d.join("cert.pem"), "not a certificate\n");
    let err = sluice::ops::reload::reload(proxy.shared()).expect_err("a broken certificate");
    assert!(err.to_string().contains("tls.cert"), "{err}");
    let mut still = tls_connect(&pki, tls_addr).await;
    assert_eq!(presented(&still), second_der);
    assert_eq!(get(&mut still, "after-bad-reload").await.0, 200);

    // A key that does not go with the certificate is a config error naming tls.key.
    let (_, cert, _) = pki.leaf();
    let (_, _, other_key) = pki.leaf();
    write(&d.join("cert.pem"), &cert);
    write(&d.join("key.pem"), &other_key);
    let err = Config::load(&d.join("sluice.toml"), &Overrides::default()).expect_err("mismatch");
    assert!(err.to_string().contains("tls.key"), "{err}");
}

/// TLS toward a backend: through a second sluice whose backend is the first one's TLS
/// listener. With the right CA the payment goes through; with another CA the certificate is
/// refused (502) and nothing reaches the backend. (No health checks at all, passive ones
/// included: they would take the backend down and turn the 502 into a 503 after the queue
/// deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_backend_is_verified_against_the_configured_ca() {
    let emu = Emulator::start(EmulatorConfig {
        workers: 64,
        service_time: Duration::from_millis(1),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let pki = Pki::new();
    let d = dir("upstream");
    let (_, cert, key) = pki.leaf();
    write(&d.join("cert.pem"), &cert);
    write(&d.join("key.pem"), &key);
    write(&d.join("ca.pem"), &pki.ca_pem);
    write(&d.join("other-ca.pem"), &Pki::new().ca_pem);
    let (_front, tls_addr) = tls_proxy(emu.addr(), 4, &d);

    for (ca, want) in [("ca.pem", 200), ("other-ca.pem", 502)] {
        let toml = format!(
            "[admission]\nmax_inflight = 2\n[slow_start]\nduration = \"0s\"\n\
             [health]\ncheck = \"none\"\npassive_failures = 0\n[log]\naccess = \"off\"\n\
             [upstream]\nca_file = \"{}\"\n\
             [[backend]]\naddress = \"{tls_addr}\"\ntls = true\nsni = \"localhost\"\n",
            d.join(ca).display()
        );
        let o = Overrides {
            listen: Some(free_local_addr().expect("port").to_string()),
            admin_listen: Some(String::new()),
            ..Overrides::default()
        };
        let cfg = Config::parse(&toml, None, &o).expect("valid");
        let edge = start(&cfg);
        let id = format!("via-tls-{want}");
        let r = sluice_tests::client::request(
            edge.addr(),
            &sluice_tests::client::Request::post("/pay", "amount=1").txn(&id),
        )
        .await
        .expect("an answer");
        assert_eq!(r.status, want, "CA {ca}: {}", r.text());
        let seen = emu.transactions().contains(&id);
        assert_eq!(seen, want == 200, "CA {ca}: reached the backend: {seen}");
    }
}
