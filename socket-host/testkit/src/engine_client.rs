//! The real whatsapp-rust engine, built from a minted snapshot (or an empty store), talking to the fake server
//! over a tokio-tungstenite transport of its own (the host has its own; this one only serves tests), with its
//! events recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wakeeper_shared::domain::CredentialSnapshot;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::http::{HttpClient, HttpRequest, HttpResponse};
use whatsapp_rust::prelude::{Bot, BotHandle, ChannelEventHandler, Client, Event};
use whatsapp_rust::store::traits::DeviceStore;
use whatsapp_rust::transport::{DisconnectReason, Transport, TransportEvent, TransportFactory};
use whatsapp_rust::wacore::store::InMemoryBackend;
use whatsapp_rust::{async_channel, async_trait};

use crate::engine_log::init_logging;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A whatsapp-rust transport over tokio-tungstenite.
struct WsFactory {
    url: String,
}

impl WsFactory {
    fn new(url: impl Into<String>) -> Self {
        Self { url: url.into() }
    }
}

struct WsTransport {
    sink: tokio::sync::Mutex<Option<SplitSink<Ws, Message>>>,
}

#[async_trait]
impl Transport for WsTransport {
    async fn send(&self, data: Bytes) -> anyhow::Result<()> {
        let mut sink = self.sink.lock().await;
        let sink = sink.as_mut().ok_or_else(|| anyhow::anyhow!("transport closed"))?;
        sink.send(Message::Binary(data)).await?;
        Ok(())
    }

    async fn disconnect(&self) {
        let sink = self.sink.lock().await.take();
        if let Some(mut sink) = sink {
            let _ = sink.close().await;
        }
    }
}

#[async_trait]
impl TransportFactory for WsFactory {
    async fn create_transport(&self) -> anyhow::Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>)> {
        let (ws, _) = tokio_tungstenite::connect_async(self.url.as_str()).await?;
        let (sink, mut stream) = ws.split();
        let (tx, rx) = async_channel::bounded(256);
        tx.try_send(TransportEvent::Connected).expect("fresh channel has room");
        tokio::spawn(async move {
            let reason = loop {
                match stream.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        if tx.send(TransportEvent::DataReceived(b)).await.is_err() {
                            return;
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
            let _ = tx.send(TransportEvent::Disconnected(reason)).await;
        });
        Ok((Arc::new(WsTransport { sink: tokio::sync::Mutex::new(Some(sink)) }), rx))
    }
}

/// The engine wants an HTTP client; with `with_version` set it never calls it.
struct NoHttp;

#[async_trait]
impl HttpClient for NoHttp {
    async fn execute(&self, _request: HttpRequest) -> anyhow::Result<HttpResponse> {
        anyhow::bail!("tests make no HTTP requests")
    }
}

/// One engine client running against the simulator, with its events recorded.
pub struct TestClient {
    pub client: Arc<Client>,
    events: async_channel::Receiver<Arc<Event>>,
    pub history: Vec<String>,
    handle: Option<BotHandle>,
    started: Instant,
}

impl TestClient {
    /// Builds an engine client from a credential snapshot (as a host restoring a tenant would) and starts
    /// its run loop.
    pub async fn start(url: &str, snapshot: &CredentialSnapshot) -> Self {
        let record = snapshot.check_restorable().expect("snapshot is restorable");
        let device = wa_sim::device_from_record(&record).expect("record converts to an engine device");
        let backend = Arc::new(InMemoryBackend::new());
        backend.save(&device).await.expect("saving the device");
        Self::start_with(url, backend).await
    }

    /// A client with an empty store: it has never been linked and asks to pair.
    pub async fn start_fresh(url: &str) -> Self {
        Self::start_with(url, Arc::new(InMemoryBackend::new())).await
    }

    async fn start_with(url: &str, backend: Arc<InMemoryBackend>) -> Self {
        init_logging();
        let bot = Bot::builder()
            .with_backend_arc(backend)
            .with_transport_factory(WsFactory::new(url))
            .with_http_client(NoHttp)
            .with_version((2, 3000, 1_023_000_000))
            .build()
            .await
            .expect("building the engine client");
        let client = bot.client();
        let (handler, events) = ChannelEventHandler::new();
        client.subscribe_handler(handler).detach();
        let handle = bot.spawn();
        Self { client, events, history: Vec::new(), handle: Some(handle), started: Instant::now() }
    }

    /// Waits for an event matching `pred`; panics with the event history on timeout.
    pub async fn wait_event(&mut self, limit: Duration, what: &str, pred: impl Fn(&Event) -> bool) -> Arc<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(ev)) => {
                    self.history.push(format!("{:>8.3}s {}", self.started.elapsed().as_secs_f64(), event_name(&ev)));
                    if pred(&ev) {
                        return ev;
                    }
                }
                Ok(Err(_)) => panic!("event stream ended while waiting for {what}; history: {:#?}", self.history),
                Err(_) => panic!("no {what} within {limit:?}; history: {:#?}", self.history),
            }
        }
    }

    pub async fn connected(&mut self, limit: Duration) {
        self.wait_event(limit, "Connected", |e| matches!(e, Event::Connected(_))).await;
    }

    /// Waits for the run loop to end on its own (terminal states end it). Returns whether it did.
    pub async fn run_loop_ends(&mut self, limit: Duration) -> bool {
        let handle = self.handle.as_mut().expect("running");
        if tokio::time::timeout(limit, handle).await.is_ok() {
            self.handle = None;
            true
        } else {
            false
        }
    }

    /// A round trip through the connection: once its answer is in, every earlier answer from the server
    /// has been read too (stanzas are processed in order).
    pub async fn barrier(&self) {
        self.client.blocking().get_blocklist().await.expect("blocklist round trip");
    }

    /// Stops the client (flushes and waits for the run loop).
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// A short name of an event for the history (the reason of a disconnect or failure included).
pub fn event_name(ev: &Event) -> String {
    match ev {
        Event::Connected(_) => "Connected".into(),
        Event::Disconnected(d) => format!("Disconnected({})", d.reason),
        Event::LoggedOut(l) => format!("LoggedOut(on_connect={}, {:?})", l.on_connect, l.reason),
        Event::StreamReplaced(_) => "StreamReplaced".into(),
        Event::StreamError(e) => format!("StreamError({})", e.code),
        Event::ConnectFailure(f) => format!("ConnectFailure({:?})", f.reason),
        Event::TemporaryBan(_) => "TemporaryBan".into(),
        Event::PairingQrCode(_) => "PairingQrCode".into(),
        other => {
            let dbg = format!("{other:?}");
            dbg.split(['(', ' ', '{']).next().unwrap_or("Event").to_owned()
        }
    }
}
