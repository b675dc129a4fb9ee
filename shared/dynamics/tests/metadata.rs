//! The F&O client reads the entity key from `$metadata` as it streams, within bounds, whatever a
//! server sends: a loopback server plays F&O.

use std::sync::Arc;

use relink_core::ports::{FnoApi, TokenSource};
use relink_core::progress::TracingSink;
use relink_core::registry::Registry;
use relink_dynamics::fno::FnoClient;
use relink_dynamics::{Http, RetryPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Fixed;

#[async_trait::async_trait]
impl TokenSource for Fixed {
    async fn token(&self, _: &str) -> relink_core::Result<String> {
        Ok("t".into())
    }
    async fn invalidate(&self, _: &str) {}
}

/// Serves one chunked `$metadata` answer: `head`, then `filler` repeated until the client stops.
async fn metadata_server(head: &'static str, filler: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let start = "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ntransfer-encoding: chunked\r\n\r\n";
                if conn.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
                if conn.write_all(chunk(head).as_bytes()).await.is_err() {
                    return;
                }
                let piece = chunk(&filler.repeat(4096));
                while conn.write_all(piece.as_bytes()).await.is_ok() {}
            });
        }
    });
    base
}

fn client(base: &str) -> FnoClient {
    let text = format!(
        "[environments.e]\nkind = \"uat\"\nfno_url = \"{base}/fno\"\ndataverse_url = \"{base}/dv\"\n\
         dataverse_unique_name = \"o\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = {{ env = \"S\" }}\n\
         authority = \"{base}\"\nallow_insecure_http = true\n"
    );
    let registry = Registry::parse(&text, |_| Some("s".into())).unwrap();
    let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(TracingSink)).unwrap());
    FnoClient::new(http, Arc::new(Fixed), registry.get("e").unwrap())
}

#[tokio::test]
async fn an_entity_type_that_never_closes_is_refused_past_a_megabyte() {
    let base = metadata_server(
        r#"<Schema><EntityType Name="DualWriteProjectConfiguration"><Key><PropertyRef Name="ProjectName" /></Key>"#,
        r#"<Property Name="X" Type="Edm.String" />"#,
    )
    .await;
    let e = client(&base).project_config_key().await.unwrap_err();
    assert!(e.to_string().contains("never ends"), "{e}");
}

#[tokio::test]
async fn metadata_that_never_describes_the_entity_ends_at_its_bound() {
    let base = metadata_server(
        "<Schema>",
        r#"<EntityType Name="Filler"><Key><PropertyRef Name="Id" /></Key></EntityType>"#,
    )
    .await;
    let e = client(&base).project_config_key().await.unwrap_err();
    assert!(e.to_string().contains("goes on past"), "{e}");
}
