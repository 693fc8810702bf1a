//! The operator page served at `GET /`: what the relay is and how to reach
//! it. It shows public facts only, never anything about queues.

use qrcode::render::svg;
use qrcode::{EcLevel, QrCode};

use tern_wire::address::RelayAddress;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page for `address` (the access key is removed here, whatever the
/// caller passes: the page is public).
pub fn render(address: &RelayAddress, open: bool) -> String {
    let text = address.without_access_key().to_string();
    let qr = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map(|code| {
            let svg = code
                .render::<svg::Color<'_>>()
                .min_dimensions(256, 256)
                .quiet_zone(true)
                .build();
            // Inline SVG in HTML must not carry an XML declaration.
            match svg.find("<svg") {
                Some(i) => svg[i..].to_string(),
                None => svg,
            }
        })
        .unwrap_or_default();
    let policy = if open {
        "Open: anyone can create queues here."
    } else {
        "Closed: creating queues needs the operator's access key. Sending to existing queues is open."
    };
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tern relay</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em;color:#222}}code{{word-break:break-all;background:#f3f3f3;padding:.2em .4em}}svg{{display:block;margin:1em 0}}</style>
</head>
<body>
<h1>tern relay</h1>
<p>tern {version}</p>
<p>Relay address:<br><code>{address}</code></p>
{qr}
<p>{policy}</p>
<p>This relay stores end-to-end encrypted messages until their recipients fetch them. It cannot read them and does not know who sends them.</p>
</body>
</html>
"#,
        version = escape(env!("CARGO_PKG_VERSION")),
        address = escape(&text),
        qr = qr,
        policy = escape(policy),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_wire::address::Host;

    #[test]
    fn never_shows_the_access_key() {
        let mut a = RelayAddress::new(Host::V4([127, 0, 0, 1].into()), 5223, [7; 32]);
        a.access_key = Some("sesame".into());
        let page = render(&a, false);
        assert!(!page.contains("sesame"));
        assert!(page.contains(&a.without_access_key().to_string()));
        assert!(page.contains("<svg") && !page.contains("<?xml"));
        assert!(page.contains("Closed"));
    }
}
