//! relink against servers that lie: a loopback server stands in for Dataverse (or Entra) and
//! answers in one hostile way per test. Each must end in a clear failure, within a bounded
//! number of requests, with no panic, no redirect followed and no wait the server dictates.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{ENV, Spec, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the hostile server answers every request.
#[derive(Clone, Copy)]
enum Lie {
    /// `302` to another host.
    Redirect,
    /// `429` with `Retry-After: 1e300`.
    EndlessRetryAfter,
    /// `400` with a body that never ends.
    EndlessErrorBody,
    /// A token whose `expires_in` is 2^64-1 (then 404 to everything else).
    EndlessToken,
    /// `200` with a body that never ends.
    EndlessAnswer,
    /// `400` whose OData message carries terminal escape codes and a carriage return.
    ForgedText,
    /// The right organisation, linked (it says) to another F&O environment; 404 to the rest.
    OtherPairing,
}

/// Serves `lie` on a free loopback port; returns its base URL and the request counter.
async fn hostile(lie: Lie) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + length {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + length);
                    seen.fetch_add(1, Ordering::SeqCst);
                    let token = head.contains("/oauth2/v2.0/token");
                    let json = |body: &str| {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let reply: String = match lie {
                        Lie::Redirect => "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/elsewhere\r\ncontent-length: 0\r\n\r\n".into(),
                        Lie::EndlessRetryAfter => "HTTP/1.1 429 Too Many Requests\r\nretry-after: 1e300\r\ncontent-length: 0\r\n\r\n".into(),
                        Lie::EndlessToken if token => {
                            let body = r#"{"token_type":"Bearer","access_token":"hostile","expires_in":18446744073709551615}"#;
                            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                        }
                        Lie::EndlessToken => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into(),
                        Lie::OtherPairing if head.contains("retrievecurrentorganization") => json(
                            r#"{"Detail":{"OrganizationId":"6f0e3b1c-0000-4000-8000-000000000001","UniqueName":"orgcontosouat","FriendlyName":"UAT","UrlName":"org","EnvironmentId":"6f0e3b1c-0000-4000-8000-0000000000e1"}}"#,
                        ),
                        Lie::OtherPairing if head.contains("retrievefinanceandoperationsintegrationdetails") => {
                            json(r#"{"Url":"https://contoso-prod.operations.dynamics.com","TenantId":"t"}"#)
                        }
                        Lie::OtherPairing => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into(),
                        Lie::ForgedText => {
                            let body = r#"{"error":{"code":"0x0","message":"\u001b[2K\u001b[32mrun succeeded\r\u001b]0;owned\u0007"}}"#;
                            format!("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                        }
                        Lie::EndlessErrorBody | Lie::EndlessAnswer => {
                            let head = if matches!(lie, Lie::EndlessAnswer) {
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                            } else {
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                            };
                            if conn.write_all(head.as_bytes()).await.is_err() {
                                return;
                            }
                            let piece = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                            while conn.write_all(piece.as_bytes()).await.is_ok() {}
                            return;
                        }
                    };
                    if conn.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (base, count)
}

/// A world whose Dataverse (or, with `authority`, Entra too) is the hostile server.
async fn world_with(lie: Lie, authority: bool) -> (World, Arc<AtomicUsize>) {
    let (base, count) = hostile(lie).await;
    let w = World::new(Spec::default()).await;
    let text = std::fs::read_to_string(&w.config).unwrap();
    let mut text = text.replace(&w.sim.dataverse_url("uat"), &format!("{base}/org"));
    if authority {
        text = text.replace(
            &format!("authority = \"{}\"", w.sim.authority()),
            &format!("authority = \"{base}\""),
        );
    }
    assert!(text.contains(&base), "{text}");
    std::fs::write(&w.config, text).unwrap();
    (w, count)
}

async fn run_against(lie: Lie, authority: bool) -> (common::Out, usize, World) {
    let (w, count) = world_with(lie, authority).await;
    let out = tokio::time::timeout(Duration::from_secs(60), w.relink(&["run", ENV]))
        .await
        .expect("relink ends within a minute whatever the server does");
    assert!(
        !out.stderr.contains("panicked"),
        "no panic on what a server sends: {out:?}"
    );
    let snap = w.sim.snapshot();
    assert!(snap.deleted.values().all(|n| *n == 0), "nothing deleted");
    (out, count.load(Ordering::SeqCst), w)
}

#[tokio::test]
async fn a_redirect_is_a_failure_not_an_answer() {
    let (out, requests, _w) = run_against(Lie::Redirect, false).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("redirect"), "{out:?}");
    assert_eq!(requests, 1, "the redirect was not followed nor retried");
}

#[tokio::test]
async fn an_absurd_retry_after_ends_the_run_instead_of_waiting() {
    let (out, requests, _w) = run_against(Lie::EndlessRetryAfter, false).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("Retry-After"), "{out:?}");
    assert_eq!(requests, 1, "{out:?}");
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_so_far() {
    let (out, requests, _w) = run_against(Lie::EndlessErrorBody, false).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(requests, 1, "{out:?}");
}

#[tokio::test]
async fn a_token_that_never_expires_is_not_believed_and_does_not_crash() {
    let (out, requests, _w) = run_against(Lie::EndlessToken, true).await;
    assert!(out.code == 1 || out.code == 2, "{out:?}");
    assert!(requests >= 2, "a token, then the identity check: {out:?}");
}

#[tokio::test]
async fn an_endless_answer_is_refused_past_its_bound() {
    let (out, requests, _w) = run_against(Lie::EndlessAnswer, false).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("larger than"), "{out:?}");
    assert_eq!(requests, 1, "{out:?}");
}

#[tokio::test]
async fn server_text_cannot_drive_the_terminal() {
    let (out, requests, w) = run_against(Lie::ForgedText, false).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(requests, 1, "{out:?}");
    let status = w.relink(&["status", ENV]).await;
    for text in [&out.stdout, &out.stderr, &status.stdout, &status.stderr] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{7}'),
            "control characters from a server reached the terminal: {text:?}"
        );
    }
    assert!(
        status.stdout.contains("run succeeded"),
        "the text is shown, escaped: {status:?}"
    );
}

#[tokio::test]
async fn a_dataverse_paired_with_another_fno_is_refused_before_anything_is_read_or_deleted() {
    let (out, requests, w) = run_against(Lie::OtherPairing, false).await;
    assert_eq!(out.code, 4, "refused: {out:?}");
    assert!(
        out.stdout.contains("contoso-prod.operations.dynamics.com")
            || out.stderr.contains("contoso-prod.operations.dynamics.com"),
        "{out:?}"
    );
    assert_eq!(requests, 2, "identity, then pairing: {out:?}");
    assert_eq!(
        w.sim.snapshot().page_reads.get("fno").copied().unwrap_or(0),
        0,
        "F&O was not even read"
    );
}

/// The dual-write gateway lies (a redirect, an endless answer, forged text): the gateway reset
/// ends at the manual gate within its bounds, having sent one request, never `succeeded`, and
/// no control character of the server's reaches the terminal.
#[tokio::test]
async fn a_lying_gateway_ends_at_the_manual_gate() {
    for (lie, said) in [
        (Lie::Redirect, "redirect"),
        (Lie::EndlessAnswer, "larger than"),
        (Lie::ForgedText, "run succeeded"),
    ] {
        let (base, count) = hostile(lie).await;
        let w = World::new(Spec {
            uat_rows: 10,
            project_configs: 3,
            registry_extra: common::gateway_reset("").replace("{sim}/gateway", &base),
            ..Spec::default()
        })
        .await;
        assert_eq!(
            w.relink(&["auth", "login", ENV, "--for", "gateway"])
                .await
                .code,
            0
        );
        let out = tokio::time::timeout(Duration::from_secs(60), w.relink(&["run", ENV, "--json"]))
            .await
            .expect("relink ends within a minute whatever the gateway does");
        assert_eq!(out.code, 3, "{out:?}");
        let run = out.json();
        assert_eq!(run["status"], "awaiting-confirmation", "{run}");
        let instructions = run["instructions"].as_str().unwrap();
        assert!(instructions.contains(said), "{instructions}");
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "one request, not followed nor retried"
        );
        for text in [&out.stdout, &out.stderr] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}'),
                "control characters from the gateway reached the terminal: {text:?}"
            );
        }
    }
}
