//! Just enough HTTP/1.1 for the relay: request heads in, fixed responses out.
//!
//! The relay serves two things (`POST /v1` with a 16 KiB body, `GET /`), so
//! the parser accepts a strict subset: a request line, headers, and a body
//! framed by Content-Length only. Anything outside that subset is refused
//! with a status code rather than guessed at.

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Root,
    V1,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, including leading empty lines and the final CRLF CRLF.
    pub len: usize,
    pub method: Method,
    pub target: Target,
    pub content_length: Option<u64>,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// No complete head yet.
    Incomplete,
    Head(Head),
    /// Answer with this status and close the connection.
    Bad(u16),
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn allowed_in_head(b: u8) -> bool {
    b == b'\r' || b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b)
}

/// Parses the request head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parse {
    // RFC 9112 §2.2: ignore empty lines before the request line (some clients
    // send a CRLF after a body).
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let window = &buf[start..buf.len().min(start + MAX_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if window.len() >= MAX_HEAD {
            Parse::Bad(431)
        } else if window.iter().any(|&b| !allowed_in_head(b)) {
            // Binary garbage can be refused before it fills the buffer.
            Parse::Bad(400)
        } else {
            Parse::Incomplete
        };
    };
    let Ok(text) = std::str::from_utf8(&window[..end]) else {
        return Parse::Bad(400);
    };
    if !text.bytes().all(allowed_in_head) {
        return Parse::Bad(400);
    }
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Bad(400);
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => return Parse::Bad(505),
        _ => return Parse::Bad(400),
    };
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        m if is_token(m) => Method::Other,
        _ => return Parse::Bad(400),
    };
    let target = match target {
        "/" => Target::Root,
        "/v1" => Target::V1,
        _ => Target::Other,
    };
    let mut content_length = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Bad(400);
        };
        // No whitespace before the colon and no obsolete line folding: both
        // are classic request-smuggling vectors.
        if !is_token(name) {
            return Parse::Bad(400);
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Parse::Bad(400);
            }
            // More digits than fit in a u64 is certainly too large.
            let n = value.parse::<u64>().unwrap_or(u64::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Parse::Bad(400);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only Content-Length framing is supported.
            return Parse::Bad(411);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == "HTTP/1.0" {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    Parse::Head(Head {
        len: start + end + 4,
        method,
        target,
        content_length,
        keep_alive,
        expect_continue,
    })
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A complete response: head and body.
pub fn response(
    status: u16,
    content_type: Option<&str>,
    extra_headers: &str,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(ct) = content_type {
        head.push_str("Content-Type: ");
        head.push_str(ct);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    head.push_str(extra_headers);
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// An error response with no body.
pub fn empty(status: u16, close: bool) -> Vec<u8> {
    response(status, None, "", &[], close)
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Head {
        match parse_head(s.as_bytes()) {
            Parse::Head(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_a_post() {
        let h = head("\r\nPOST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\nExpect: 100-continue\r\n\r\nBODY");
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.target, Target::V1);
        assert_eq!(h.content_length, Some(16384));
        assert!(h.keep_alive && h.expect_continue);
        assert_eq!(h.len, "\r\nPOST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 16384\r\nExpect: 100-continue\r\n\r\n".len());
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive && h.target == Target::Root);
        let h = head("GET /x HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive && h.target == Target::Other);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for (req, status) in [
            (
                "POST /v1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (
                "POST /v1 HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            ("POST /v1 HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST /v1 HTTP/1.1\r\nContent-Length : 1\r\n\r\n", 400),
            ("POST /v1 HTTP/1.1\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET  / HTTP/1.1\r\n\r\n", 400),
            ("GET /\r\n\r\n", 400),
        ] {
            assert_eq!(parse_head(req.as_bytes()), Parse::Bad(status), "{req:?}");
        }
        assert_eq!(parse_head(b"\x16\x03\x01\x02\x00\x01"), Parse::Bad(400));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Parse::Incomplete);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(long.as_bytes()), Parse::Bad(431));
        let huge = head("POST /v1 HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert_eq!(huge.content_length, Some(u64::MAX));
    }
}
