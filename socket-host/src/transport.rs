//! The engine's network edges, on the host's own stacks: a WebSocket transport on tokio-tungstenite (the
//! same stack the fake server uses) and an HTTP client on reqwest (media and version look-ups).

use std::sync::atomic::{AtomicI64, AtomicU16, Ordering};
use std::sync::{Arc, LazyLock};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Mutex, Notify};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};
use whatsapp_rust::transport::{DisconnectReason, Transport, TransportEvent, TransportFactory};
use whatsapp_rust::{async_channel, async_trait};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Initial WebSocket read buffer per socket.
const READ_BUFFER: usize = 2 * 1024;

/// How many inbound frames may wait for the engine before the reader stops pulling from the socket. The queue's
/// slots are allocated up front (64 bytes each) for every open session; the engine drains frames as they come,
/// so a few are enough to keep the socket read while it works on one.
const INBOUND_QUEUE: usize = 8;
/// How long a hang-up waits to hand the server its Close frame before the socket is closed anyway.
const CLOSE_FRAME_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the transport saw of one tenant's link, for the supervisor: when the last frame arrived and whether
/// the last upgrade was refused with an HTTP status (429 and 503 pace the backoff).
#[derive(Debug, Default)]
pub struct LinkProbe {
    last_frame_ms: AtomicI64,
    refused_status: AtomicU16,
}

impl LinkProbe {
    /// Milliseconds since the epoch of the last frame received, 0 if none yet.
    pub fn last_frame_ms(&self) -> i64 {
        self.last_frame_ms.load(Ordering::Relaxed)
    }

    /// Takes the HTTP status of the last refused upgrade (0 if none), clearing it.
    pub fn take_refused_status(&self) -> u16 {
        self.refused_status.swap(0, Ordering::Relaxed)
    }
}

/// Opens one WebSocket per engine connect attempt to a fixed URL.
#[derive(Clone, Debug)]
pub struct WsTransportFactory {
    url: Arc<str>,
    probe: Arc<LinkProbe>,
}

impl WsTransportFactory {
    /// A factory for `url` (`wss://web.whatsapp.com/ws/chat` in production, the fake server in tests).
    pub fn new(url: impl Into<Arc<str>>) -> Self {
        Self { url: url.into(), probe: Arc::default() }
    }

    /// Reports what the link sees into `probe`.
    pub fn with_probe(mut self, probe: Arc<LinkProbe>) -> Self {
        self.probe = probe;
        self
    }
}

struct WsTransport {
    sink: Mutex<Option<SplitSink<Ws, Message>>>,
    /// Tells the reader task the engine hung up: it drops the read half at once, so the socket is closed even
    /// when nothing reads the queue any more or the server never answers the Close frame.
    closing: Arc<Notify>,
}

#[async_trait]
impl Transport for WsTransport {
    async fn send(&self, data: Bytes) -> anyhow::Result<()> {
        let mut sink = self.sink.lock().await;
        let sink = sink.as_mut().ok_or_else(|| anyhow::anyhow!("socket closed"))?;
        sink.send(Message::Binary(data)).await?;
        Ok(())
    }

    async fn disconnect(&self) {
        if let Some(mut sink) = self.sink.lock().await.take() {
            // A peer that stopped reading cannot hold the hang-up: the Close frame gets a moment, then both
            // halves go and the kernel closes the socket. Never two live sockets for one device.
            let _ = tokio::time::timeout(CLOSE_FRAME_WAIT, sink.close()).await;
        }
        self.closing.notify_one();
    }
}

#[async_trait]
impl TransportFactory for WsTransportFactory {
    async fn create_transport(&self) -> anyhow::Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>)> {
        let mut request = self.url.as_ref().into_client_request()?;
        request.headers_mut().insert("Origin", HeaderValue::from_static("https://web.whatsapp.com"));
        // tungstenite's default 128 KiB read buffer is kept resident (zero-filled) per socket: half of an idle
        // session's memory. 2 KiB holds an idle link's frames (pings, receipts) and grows for a larger one
        // (docs/benchmarks.md: 8 KiB to 2 KiB took about 5 KiB off each idle session).
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER).write_buffer_size(0);
        let connector = (request.uri().scheme_str() == Some("wss")).then(tls_connector);
        let ws = match tokio_tungstenite::connect_async_tls_with_config(request, Some(config), false, connector).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                self.probe.refused_status.store(status, Ordering::Relaxed);
                anyhow::bail!("websocket upgrade refused with HTTP {status}");
            }
            Err(e) => return Err(e.into()),
        };
        let (sink, mut stream) = ws.split();
        let probe = self.probe.clone();
        let (tx, rx) = async_channel::bounded(INBOUND_QUEUE);
        let _ = tx.try_send(TransportEvent::Connected);
        let closing = Arc::new(Notify::new());
        let hung_up = closing.clone();
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::select! {
                    biased;
                    () = hung_up.notified() => break DisconnectReason::Unknown,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(Message::Binary(b))) => {
                        probe.last_frame_ms.store(wakeeper_shared::domain::now_millis(), Ordering::Relaxed);
                        tokio::select! {
                            biased;
                            () = hung_up.notified() => break DisconnectReason::Unknown,
                            sent = tx.send(TransportEvent::DataReceived(b)) => if sent.is_err() {
                                return; // the engine dropped this connection
                            },
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break DisconnectReason::ServerClose {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break DisconnectReason::ReadError(e.to_string()),
                    None => break DisconnectReason::StreamEnded,
                }
            };
            // The read half goes here (with the write half already gone after a hang-up, the socket closes).
            drop(stream);
            if matches!(reason, DisconnectReason::Unknown) {
                // The engine hung up itself and may have stopped reading: told if there is room, never waited on.
                let _ = tx.try_send(TransportEvent::Disconnected(reason));
            } else {
                let _ = tx.send(TransportEvent::Disconnected(reason)).await;
            }
        });
        Ok((Arc::new(WsTransport { sink: Mutex::new(Some(sink)), closing }), rx))
    }
}

/// The TLS side of every `wss://` socket of the process: one client configuration (rustls on the process's one
/// crypto provider, `wakeeper_shared::tls`; the webpki roots), built on first use and shared, so a reconnect
/// builds no TLS configuration and an open session holds no copy of one.
fn tls_connector() -> Connector {
    static CONFIG: LazyLock<Arc<rustls::ClientConfig>> = LazyLock::new(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let config = rustls::ClientConfig::builder_with_provider(wakeeper_shared::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("aws-lc-rs supports rustls' default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    });
    Connector::Rustls(CONFIG.clone())
}

/// The engine's HTTP client on reqwest (rustls, webpki roots). Cheap to clone: clones share one connection pool
/// and TLS configuration, so a host makes one and hands it to every client it builds. A client of its own per
/// connect attempt cost each open session about 25 KiB (rustls' session cache alone preallocates 14 KiB) and
/// the CPU of building a TLS configuration on every reconnect (docs/benchmarks.md).
#[derive(Clone, Debug)]
pub struct ReqwestHttpClient {
    client: reqwest::Client,
}

impl Default for ReqwestHttpClient {
    fn default() -> Self {
        Self { client: wakeeper_shared::tls::http_client().build().expect("the http client builds") }
    }
}

#[async_trait]
impl HttpClient for ReqwestHttpClient {
    async fn execute(&self, request: HttpRequest) -> anyhow::Result<HttpResponse> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())?;
        let mut builder = self.client.request(method, &request.url);
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder.body(body.to_vec());
        }
        let response = builder.send().await?;
        let status_code = response.status().as_u16();
        let body = response.bytes().await?.to_vec();
        Ok(HttpResponse { status_code, body })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use whatsapp_rust::transport::TransportFactory;

    use super::*;

    /// Connects the transport to `scheme://` a local listener and returns the first `N` bytes that reached it
    /// (the listener then hangs up, so no socket can open) and whether the attempt failed.
    async fn first_bytes_on_the_wire<const N: usize>(scheme: &str) -> ([u8; N], bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("{scheme}://{}/ws/chat", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut first = [0u8; N];
            socket.read_exact(&mut first).await.unwrap();
            first
        });
        let attempt = WsTransportFactory::new(url).create_transport().await;
        // An attempt that fails before connecting (no TLS compiled in) sends nothing at all.
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("no connection reached the server")
            .unwrap();
        (first, attempt.is_err())
    }

    /// Production's `wss://web.whatsapp.com` needs TLS under the WebSocket: the first bytes on the wire must be
    /// a TLS ClientHello, not an HTTP upgrade (nor an error that TLS is not compiled in).
    #[tokio::test]
    async fn a_wss_url_is_spoken_to_in_tls() {
        let (header, failed) = first_bytes_on_the_wire::<6>("wss").await;
        assert_eq!(header[0], 0x16, "the first record is not a TLS handshake: {header:?}");
        assert_eq!(header[1], 0x03, "not a TLS record version: {header:?}");
        assert_eq!(header[5], 0x01, "the first handshake message is not a ClientHello: {header:?}");
        assert!(failed, "the server never answered the ClientHello, so no socket can open");
    }

    #[tokio::test]
    async fn a_ws_url_is_spoken_to_in_plain_http() {
        let (start, failed) = first_bytes_on_the_wire::<4>("ws").await;
        assert_eq!(&start, b"GET ");
        assert!(failed);
    }
}
