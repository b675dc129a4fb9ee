//! The client's OData `$batch` (multipart/mixed) encoder and response decoder. The simulators
//! have their own, independent implementation.

use relink_core::error::{Error, Result};

/// A `$batch` request body and its content type.
pub struct BatchRequest {
    pub content_type: String,
    pub body: String,
}

/// Encodes one `DELETE` per target (origin-relative paths), outside any change set so each
/// delete stands alone (with `Prefer: odata.continue-on-error`).
pub fn encode_deletes(paths: &[String]) -> BatchRequest {
    let boundary = format!("batch_{}", uuid::Uuid::new_v4().simple());
    let mut body = String::with_capacity(paths.len() * 160);
    for (i, path) in paths.iter().enumerate() {
        body.push_str("--");
        body.push_str(&boundary);
        body.push_str("\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: ");
        body.push_str(&(i + 1).to_string());
        body.push_str("\r\n\r\nDELETE ");
        body.push_str(path);
        body.push_str(" HTTP/1.1\r\n\r\n");
    }
    body.push_str("--");
    body.push_str(&boundary);
    body.push_str("--\r\n");
    BatchRequest {
        content_type: format!("multipart/mixed; boundary={boundary}"),
        body,
    }
}

/// One operation's answer inside a batch response.
#[derive(Debug, PartialEq, Eq)]
pub struct PartResponse {
    pub status: u16,
    pub body: String,
}

/// Most answers one batch response may carry: relink sends at most 1,000 operations.
const MAX_PARTS: usize = 2_000;

/// Decodes a batch response into per-operation answers, in order (change sets flattened). OData
/// nests one level only (a change set inside the batch); deeper nesting, or more parts than a
/// batch relink sends could answer, is a protocol error, so a server cannot exhaust the stack
/// or memory.
pub fn decode_response(content_type: &str, body: &str) -> Result<Vec<PartResponse>> {
    let mut out = Vec::new();
    decode_into(content_type, body, 0, &mut out)?;
    Ok(out)
}

fn decode_into(
    content_type: &str,
    body: &str,
    depth: usize,
    out: &mut Vec<PartResponse>,
) -> Result<()> {
    let boundary = boundary_of(content_type)
        .ok_or_else(|| protocol(format!("no boundary in {content_type:?}")))?;
    for part in split_parts(body, &boundary)? {
        if out.len() >= MAX_PARTS {
            return Err(protocol(format!(
                "the batch response has more than {MAX_PARTS} parts"
            )));
        }
        let (headers, payload) = split_head(part);
        let ctype = header(headers, "content-type").unwrap_or_default();
        if ctype.to_ascii_lowercase().starts_with("multipart/mixed") {
            if depth >= 1 {
                return Err(protocol(
                    "a change set nested inside a change set: OData allows one level".into(),
                ));
            }
            decode_into(&ctype, payload, depth + 1, out)?;
            continue;
        }
        // payload: "HTTP/1.1 204 No Content\r\nheaders\r\n\r\nbody"
        let (head, inner_body) = split_head(payload);
        let status_line = head.lines().next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| protocol(format!("bad status line {status_line:?}")))?;
        out.push(PartResponse {
            status,
            body: inner_body.trim().to_string(),
        });
    }
    Ok(())
}

fn protocol(detail: String) -> Error {
    Error::Protocol {
        service: "$batch",
        detail,
    }
}

fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

fn split_parts<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>> {
    let delim = format!("--{boundary}");
    let mut pieces = body.split(delim.as_str());
    pieces.next(); // preamble
    let mut parts = Vec::new();
    let mut closed = false;
    for p in pieces {
        if p.starts_with("--") {
            closed = true;
            break;
        }
        parts.push(p.trim_start_matches("\r\n").trim_start_matches('\n'));
    }
    if !closed {
        return Err(protocol("multipart body has no closing boundary".into()));
    }
    Ok(parts)
}

fn split_head(s: &str) -> (&str, &str) {
    if let Some(i) = s.find("\r\n\r\n") {
        (&s[..i], &s[i + 4..])
    } else if let Some(i) = s.find("\n\n") {
        (&s[..i], &s[i + 2..])
    } else {
        (s, "")
    }
}

fn header(headers: &str, name: &str) -> Option<String> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_one_part_per_delete_with_crlf() {
        let req = encode_deletes(&["/api/data/v9.2/x(1)".into(), "/api/data/v9.2/x(2)".into()]);
        let boundary = req.content_type.split("boundary=").nth(1).unwrap();
        assert_eq!(req.body.matches(&format!("--{boundary}\r\n")).count(), 2);
        assert!(
            req.body
                .contains("DELETE /api/data/v9.2/x(2) HTTP/1.1\r\n\r\n")
        );
        assert!(req.body.ends_with(&format!("--{boundary}--\r\n")));
    }

    #[test]
    fn decodes_documented_response_with_a_change_set() {
        let body = "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n\r\n\r\n\
--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"0x80040217\",\"message\":\"Does Not Exist\"}}\r\n\
--changesetresponse_2--\r\n--batchresponse_1--\r\n";
        let parts = decode_response("multipart/mixed; boundary=batchresponse_1", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].status, 204);
        assert_eq!(parts[1].status, 404);
        assert!(parts[1].body.contains("Does Not Exist"));
    }

    #[test]
    fn nesting_deeper_than_a_change_set_is_refused_without_recursing() {
        // 30,000 nested multiparts: refused at the second level, not by a stack overflow.
        let mut body = String::new();
        for i in 0..30_000 {
            body.push_str(&format!(
                "--b{i}\r\nContent-Type: multipart/mixed; boundary=b{}\r\n\r\n",
                i + 1
            ));
        }
        for i in (0..30_000).rev() {
            body.push_str(&format!("--b{i}--\r\n"));
        }
        let e = decode_response("multipart/mixed; boundary=b0", &body).unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
        let one =
            "--c\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\r\n";
        let many = format!("{}--c--\r\n", one.repeat(MAX_PARTS + 1));
        let e = decode_response("multipart/mixed; boundary=c", &many).unwrap_err();
        assert!(e.to_string().contains("parts"), "{e}");
    }

    #[test]
    fn truncated_responses_are_errors() {
        assert!(
            decode_response(
                "multipart/mixed; boundary=b",
                "--b\r\n\r\nHTTP/1.1 204 No Content\r\n"
            )
            .is_err()
        );
        assert!(decode_response("application/json", "{}").is_err());
    }
}
