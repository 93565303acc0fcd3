//! The engine's WebSocket transport over a real socket: when the engine hangs up, the socket is closed even if
//! nothing reads the inbound queue any more and the server never answers the Close frame. A socket left open
//! there is a second live connection of the device once the supervisor reconnects.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use socket_host::transport::WsTransportFactory;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use whatsapp_rust::transport::TransportFactory;

#[tokio::test]
async fn a_hang_up_closes_the_socket_while_the_engine_reads_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/chat", listener.local_addr().unwrap());
    let (sent_tx, sent) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        // More frames than the transport queues for the engine, which reads none of them: the reader is left
        // waiting for room.
        for i in 0..64u8 {
            ws.send(Message::Binary(vec![i; 32].into())).await.unwrap();
        }
        ws.flush().await.unwrap();
        let _ = sent_tx.send(());
        // The Close frame first, as a hang-up says goodbye...
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return false,
            }
        }
        // ...then the socket itself must close: read the raw TCP stream until it ends.
        let tcp = ws.get_mut();
        let mut buf = [0u8; 256];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    });

    let factory = WsTransportFactory::new(url);
    let (transport, _events) = factory.create_transport().await.unwrap();
    // Every frame is on its way: the reader fills the queue and waits for room (the outcome must hold
    // whether or not it got that far when the engine hangs up).
    sent.await.unwrap();
    transport.disconnect().await;

    let closed = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the socket was closed after the hang-up, with the engine's queue full")
        .unwrap();
    assert!(closed, "the server got a Close frame before the socket ended");
}
