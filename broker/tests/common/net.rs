//! Helpers for listener tests: certificates made with rcgen, TLS and WebSocket clients, an
//! authenticator that records what each CONNECT carried, and brokers with several listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use ferrymq::auth::{AuthDecision, Authenticator, Credentials, Identity};
use ferrymq::broker::Broker;
use ferrymq::config::{Config, ListenerConfig, ListenerProtocol};
use ferrymq::connection::transport::WsIo;
use ferrymq::server::Server;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::WebSocketStream;

use super::ByteStream;

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for localhost / 127.0.0.1, with `cn` as its subject.
    pub fn server(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with subject CN `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.client_with(cn, |_| {})
    }

    pub fn client_with(&self, cn: &str, tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        tweak(&mut params);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// Files of a TLS listener.
pub struct TlsFiles {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TlsFiles {
    pub fn write(server: &Leaf, client_ca: Option<&Ca>) -> TlsFiles {
        let dir = tempfile::Builder::new()
            .prefix("ferrymq-tls-")
            .tempdir()
            .unwrap()
            .keep();
        let files = TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("client-ca.pem"),
            dir,
        };
        files.replace(server);
        if let Some(ca) = client_ca {
            std::fs::write(&files.client_ca, &ca.cert_pem).unwrap();
        }
        files
    }

    /// Replaces the certificate and key the way deployment tools do: write aside, rename.
    pub fn replace(&self, server: &Leaf) {
        replace_file(&self.key, server.key_pem.as_bytes());
        replace_file(&self.cert, server.cert_pem.as_bytes());
    }
}

pub fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A listener config of `protocol` on a free loopback port.
pub fn listener(name: &str, protocol: ListenerProtocol) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        protocol,
        ..ListenerConfig::default()
    }
}

pub fn tls_listener(name: &str, protocol: ListenerProtocol, files: &TlsFiles) -> ListenerConfig {
    ListenerConfig {
        cert_file: Some(files.cert.clone()),
        key_file: Some(files.key.clone()),
        ..listener(name, protocol)
    }
}

/// What one CONNECT showed the authenticator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub client_id: String,
    pub peer: SocketAddr,
    pub listener: String,
    pub cert_cn: Option<String>,
    pub chain_len: usize,
}

/// Allows everyone and records what each CONNECT carried.
#[derive(Default)]
pub struct Recorder {
    pub seen: parking_lot::Mutex<Vec<Seen>>,
}

impl Recorder {
    pub fn last(&self, client_id: &str) -> Option<Seen> {
        self.seen
            .lock()
            .iter()
            .rev()
            .find(|s| s.client_id == client_id)
            .cloned()
    }
}

#[async_trait]
impl Authenticator for Recorder {
    async fn authenticate(&self, c: &Credentials<'_>) -> AuthDecision {
        self.seen.lock().push(Seen {
            client_id: c.client_id.to_string(),
            peer: c.peer,
            listener: c.listener.to_string(),
            cert_cn: c.client_cert.and_then(|cc| cc.subject_cn.clone()),
            chain_len: c.client_cert.map_or(0, |cc| cc.chain_der.len()),
        });
        AuthDecision::Allow(Identity::unrestricted())
    }
}

/// Starts a broker with exactly `listeners` and a recording authenticator. Returns the bound
/// addresses in listener order.
pub async fn start_listeners(
    listeners: Vec<ListenerConfig>,
    tweak: impl FnOnce(&mut Config),
) -> (Server, Vec<SocketAddr>, Arc<Recorder>) {
    let mut config = Config {
        listeners,
        data_dir: tempfile::Builder::new()
            .prefix("ferrymq-test-")
            .tempdir()
            .unwrap()
            .keep(),
        ..Config::default()
    };
    // Any free port: tests run side by side.
    config.http.bind = "127.0.0.1:0".parse().unwrap();
    tweak(&mut config);
    config.validate().unwrap();
    let recorder = Arc::new(Recorder::default());
    let broker = Broker::open_with_authenticator(config, recorder.clone())
        .await
        .unwrap();
    let server = Server::start_with(broker).await.unwrap();
    let addrs = server.local_addrs().to_vec();
    (server, addrs, recorder)
}

/// A rustls client config trusting `ca`, presenting `client` when given (ring provider).
pub fn client_config(
    ca: &CertificateDer<'static>,
    client: Option<&Leaf>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert_der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Opens TCP + TLS to `addr` (server name `localhost`).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presented on `stream`.
pub fn server_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Runs a WebSocket upgrade over `stream` to `path`, offering `subprotocol` when given.
pub async fn ws_upgrade<S: ByteStream>(
    stream: S,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<WebSocketStream<S>, tokio_tungstenite::tungstenite::Error> {
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .unwrap();
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, response) = tokio_tungstenite::client_async(request, stream).await?;
    if let Some(p) = subprotocol {
        if p.split(',').any(|o| o.trim() == "mqtt") {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok()),
                Some("mqtt"),
                "the broker must select the mqtt subprotocol [MQTT-6.0.0-4]"
            );
        }
    }
    Ok(ws)
}

/// A WebSocket as a byte stream for [`super::Raw`].
pub fn ws_bytes<S: ByteStream>(ws: WebSocketStream<S>) -> WsIo<S> {
    WsIo::new(ws)
}
