//! The simulators' own OData `$batch` codec, written from the OData 4.0 multipart/mixed format
//! independently of the client's (a format misread on one side must not hide on the other).

/// One operation inside a batch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub method: String,
    pub target: String,
    pub content_id: Option<String>,
    /// Index of the change set the operation belongs to, if any.
    pub changeset: Option<usize>,
}

/// Reads the `boundary` parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let kind = parts.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

/// Splits a multipart body into its parts (without the delimiter lines).
fn parts<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>, String> {
    let open = format!("--{boundary}");
    let mut out = Vec::new();
    let mut rest = match body.find(&open) {
        Some(i) => &body[i + open.len()..],
        None => return Err("the body does not contain the batch boundary".into()),
    };
    loop {
        if rest.starts_with("--") {
            return Ok(out);
        }
        rest = rest
            .strip_prefix("\r\n")
            .ok_or("a boundary line must end with CRLF")?;
        let end = rest
            .find(&format!("\r\n{open}"))
            .ok_or("a part is not closed by the boundary (missing CRLF before it?)")?;
        out.push(&rest[..end]);
        rest = &rest[end + 2 + open.len()..];
    }
}

fn head_and_body(s: &str) -> (&str, &str) {
    match s.find("\r\n\r\n") {
        Some(i) => (&s[..i], &s[i + 4..]),
        None => (s, ""),
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Parses a batch request into operations, flattening change sets.
pub fn parse_request(content_type: &str, body: &str) -> Result<Vec<Operation>, String> {
    let b = boundary(content_type).ok_or("Content-Type must be multipart/mixed with a boundary")?;
    let mut ops = Vec::new();
    let mut changesets = 0;
    for part in parts(body, &b)? {
        let (head, inner) = head_and_body(part);
        let ctype = header(head, "Content-Type").unwrap_or("");
        if let Some(cs) = boundary(ctype) {
            for cpart in parts(inner, &cs)? {
                let (chead, cinner) = head_and_body(cpart);
                ops.push(operation(chead, cinner, Some(changesets))?);
            }
            changesets += 1;
        } else {
            ops.push(operation(head, inner, None)?);
        }
    }
    Ok(ops)
}

fn operation(head: &str, inner: &str, changeset: Option<usize>) -> Result<Operation, String> {
    if !header(head, "Content-Type").is_some_and(|t| t.eq_ignore_ascii_case("application/http")) {
        return Err("each batch part must have Content-Type: application/http".into());
    }
    let line = inner.split("\r\n").next().unwrap_or("");
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Err(format!("bad request line {line:?}"));
    };
    if version != "HTTP/1.1" {
        return Err(format!("bad request line {line:?}"));
    }
    Ok(Operation {
        method: method.to_string(),
        target: target.to_string(),
        content_id: header(head, "Content-ID").map(str::to_string),
        changeset,
    })
}

/// One operation's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Option<String>,
    pub content_id: Option<String>,
    pub changeset: Option<usize>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        424 => "Failed Dependency",
        _ => "Error",
    }
}

fn write_answer(out: &mut String, a: &Answer) {
    out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(id) = &a.content_id {
        out.push_str(&format!("Content-ID: {id}\r\n"));
    }
    out.push_str(&format!(
        "\r\nHTTP/1.1 {} {}\r\nOData-Version: 4.0\r\n",
        a.status,
        reason(a.status)
    ));
    match &a.body {
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json; odata.metadata=minimal\r\n\r\n{b}\r\n"
        )),
        None => out.push_str("\r\n\r\n"),
    }
}

/// Encodes answers as a batch response; returns (content type, body).
pub fn encode_response(answers: &[Answer]) -> (String, String) {
    let b = format!("batchresponse_{}", uuid::Uuid::new_v4());
    let mut out = String::new();
    let mut i = 0;
    while i < answers.len() {
        out.push_str(&format!("--{b}\r\n"));
        match answers[i].changeset {
            Some(cs) => {
                let cb = format!("changesetresponse_{}", uuid::Uuid::new_v4());
                out.push_str(&format!(
                    "Content-Type: multipart/mixed; boundary={cb}\r\n\r\n"
                ));
                while i < answers.len() && answers[i].changeset == Some(cs) {
                    out.push_str(&format!("--{cb}\r\n"));
                    write_answer(&mut out, &answers[i]);
                    i += 1;
                }
                out.push_str(&format!("--{cb}--\r\n"));
            }
            None => {
                write_answer(&mut out, &answers[i]);
                i += 1;
            }
        }
    }
    out.push_str(&format!("--{b}--\r\n"));
    (format!("multipart/mixed; boundary={b}"), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documented_batch_with_change_set() {
        let body = "--batch_AAA\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
DELETE /api/data/v9.2/tasks(1) HTTP/1.1\r\n\r\n\
--batch_AAA\r\nContent-Type: multipart/mixed; boundary=changeset_BBB\r\n\r\n\
--changeset_BBB\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
DELETE /api/data/v9.2/tasks(2) HTTP/1.1\r\n\r\n\
--changeset_BBB--\r\n--batch_AAA--\r\n";
        let ops = parse_request("multipart/mixed; boundary=batch_AAA", body).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].target, "/api/data/v9.2/tasks(1)");
        assert_eq!(ops[1].changeset, Some(0));
    }

    #[test]
    fn rejects_bare_lf_and_missing_boundaries() {
        assert!(
            parse_request(
                "multipart/mixed; boundary=x",
                "--x\nContent-Type: application/http\n\nDELETE /a HTTP/1.1\n\n--x--\n"
            )
            .is_err()
        );
        assert!(parse_request("application/json", "{}").is_err());
    }
}
