//! Every production client of a cloud service speaks TLS on its first connection: each is pointed at a plain
//! TCP listener on 127.0.0.1 and the first bytes that arrive must be a TLS ClientHello (a handshake record,
//! 0x16, whose first message is a ClientHello, 0x01). No panic (as when no rustls crypto provider can be
//! chosen), no plain text. The listener then hangs up, so every call fails; that failure is expected.
//!
//! Needs no local server: the listener is the test's own.

use std::future::Future;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// How long a client may take to send its first bytes (a bound, not a wait: the test ends as soon as they come).
const FIRST_BYTES: Duration = Duration::from_secs(30);

/// Runs `client` against `https://127.0.0.1:PORT` of a fresh listener and returns the first six bytes its first
/// connection sent. The client's own result is ignored: with the listener gone it can only fail.
async fn first_bytes_of<F, Fut, T>(client: F) -> [u8; 6]
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = T>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let server = async move {
        let (mut socket, _) = listener.accept().await.expect("the client connected");
        let mut first = [0u8; 6];
        socket.read_exact(&mut first).await.expect("the client sent six bytes");
        first
    };
    let client = async move {
        let _ = tokio::time::timeout(FIRST_BYTES, client(url)).await;
    };
    let (first, ()) = tokio::join!(tokio::time::timeout(FIRST_BYTES, server), client);
    first.expect("no connection reached the listener")
}

/// Asserts the bytes open a TLS record carrying a ClientHello: content type 22 (handshake), a TLS record
/// version 3.x, and handshake type 1 after the two length bytes.
fn assert_client_hello(first: [u8; 6], client: &str) {
    assert_eq!(first[0], 0x16, "{client}: the first record is not a TLS handshake: {first:02x?}");
    assert_eq!(first[1], 0x03, "{client}: not a TLS record version: {first:02x?}");
    assert_eq!(first[5], 0x01, "{client}: the first handshake message is not a ClientHello: {first:02x?}");
}

/// The Firestore credential store as the host opens it (no emulator: an `https` API URL), on its first
/// connection. Before the process had one provider, tonic panicked here ("Could not automatically determine the
/// process-level CryptoProvider").
#[cfg(feature = "firestore")]
#[tokio::test]
async fn the_firestore_client_says_client_hello() {
    use firestore::FirestoreDbOptions;
    use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
    use wakeeper_shared::crypto::Cipher;
    let first = first_bytes_of(|url| async move {
        let options = FirestoreDbOptions::new("wakeeper-tls-test".into()).with_firebase_api_url(url);
        FirestoreCredentialStore::connect(options, Cipher::new(&[7; 32]), "tls-test-").await.map(|_| ())
    })
    .await;
    assert_client_hello(first, "firestore");
}

/// The AWS configuration the functions and the host load (`aws_config` defaults), pointed at `url`; retries off
/// so the refused retries do not stretch the test, static credentials so nothing looks for a role.
#[cfg(feature = "dynamodb")]
async fn aws_config_at(url: &str) -> aws_config::SdkConfig {
    use aws_config::retry::RetryConfig;
    use aws_config::{BehaviorVersion, Region};
    use aws_sdk_dynamodb::config::Credentials;
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("tlstest", "tlstest", None, None, "tls-test"))
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

/// The tenant table's client as production builds it (`Client::new` over the loaded configuration).
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn the_dynamodb_client_says_client_hello() {
    use wakeeper_shared::adapters::dynamodb::DynamoTenantStore;
    use wakeeper_shared::ports::TenantStore;
    let first = first_bytes_of(|url| async move {
        let client = aws_sdk_dynamodb::Client::new(&aws_config_at(&url).await);
        DynamoTenantStore::new(client, "tenants").list_desired(None, 10).await.map(|_| ())
    })
    .await;
    assert_client_hello(first, "dynamodb");
}

/// The endpoint-override client (`WAKEEPER_DYNAMODB_ENDPOINT`) given an `https` URL.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn the_dynamodb_endpoint_client_says_client_hello() {
    use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
    use wakeeper_shared::ports::TenantStore;
    let first = first_bytes_of(|url| async move {
        DynamoTenantStore::new(dynamo_client_for_endpoint(&url), "tenants").list_desired(None, 10).await.map(|_| ())
    })
    .await;
    assert_client_hello(first, "dynamodb endpoint");
}

/// The functions' secret loading (`resolve_secret` on a Secrets Manager reference).
#[cfg(feature = "lambda")]
#[tokio::test]
async fn the_secrets_manager_client_says_client_hello() {
    use wakeeper_shared::lambda::{Secret, resolve_secret};
    let first = first_bytes_of(|url| async move {
        let sdk = aws_config_at(&url).await;
        let arn = "arn:aws:secretsmanager:us-east-1:000000000000:secret:control-token".to_owned();
        resolve_secret(&Secret::SecretArn(arn), Some(&sdk)).await.map(|_| ())
    })
    .await;
    assert_client_hello(first, "secrets manager");
}

/// The sweep's SNS alert sink.
#[cfg(feature = "sns")]
#[tokio::test]
async fn the_sns_client_says_client_hello() {
    use wakeeper_shared::alerts::{AlertEvent, AlertMessage, AlertSink, SnsAlerts};
    let first = first_bytes_of(|url| async move {
        let sink = SnsAlerts::new(&aws_config_at(&url).await, "arn:aws:sns:us-east-1:000000000000:alerts".into());
        let alert = AlertMessage::new(AlertEvent::HostUnreachable { reason: "tls test".into() }, 0);
        sink.send(&alert).await
    })
    .await;
    assert_client_hello(first, "sns");
}

/// The functions' control-API client given an `https` host URL.
#[cfg(feature = "client")]
#[tokio::test]
async fn the_control_api_client_says_client_hello() {
    use wakeeper_shared::host_api::HostClient;
    let first = first_bytes_of(|url| async move {
        let client = HostClient::new(&url, "token", Duration::from_secs(10)).unwrap();
        client.sessions().await.map(|_| ())
    })
    .await;
    assert_client_hello(first, "control api");
}
