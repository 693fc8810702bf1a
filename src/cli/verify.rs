//! `tern verify`: compare security codes out of band.

use std::path::{Path, PathBuf};

use super::exit::{fail, CODE_MISMATCH, USAGE};
use super::output::{json, line, note, stdout_is_terminal};
use super::{qr, unlock, Cli};
use crate::client::Client;
use crate::proto::security_code::codes_match;

/// What the QR code of a security code holds before the digits.
const CODE_PREFIX: &str = "TERN-CODE:";

/// Show a contact's security code, or compare it with theirs
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern verify bob                       # show the code (and its QR code)\n  tern verify bob '12345 67890 …'        # compare with the code Bob reads out\n  tern verify bob --image bob-code.jpg  # compare with a picture of Bob's screen\n\nA mismatch exits with status 4: someone may have swapped the invitation."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// The code the contact sees: 30 digits; spaces and dashes are ignored
    pub code: Option<String>,
    /// Print one JSON object: the code, or whether the codes match
    #[arg(long)]
    pub json: bool,
    /// A picture (photo or screenshot, PNG or JPEG) of the QR code that
    /// `tern verify` shows on the contact's screen, to compare instead of
    /// digits
    #[arg(long, value_name = "FILE", conflicts_with = "code")]
    pub image: Option<PathBuf>,
}

/// Digits of a code as typed: `Some` only for something that is a code
/// (30 digits, with any spaces and dashes, or the `TERN-CODE:` text of the
/// QR code), so a typo in the command is a usage error, not a mismatch.
pub fn parse_code(typed: &str) -> Option<String> {
    let t = typed.trim();
    let t = t.strip_prefix("TERN-CODE:").unwrap_or(t);
    if !t
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
    {
        return None;
    }
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    (digits.len() == 30).then_some(digits)
}

pub fn run(cli: &Cli, args: &Args) -> anyhow::Result<()> {
    let theirs = match (&args.code, &args.image) {
        (Some(typed), _) => Some(parse_code(typed).ok_or_else(|| {
            fail(
                USAGE,
                "that is not a security code: a code is 30 digits in six groups \
                 (`tern verify CONTACT` shows yours); nothing was compared",
            )
        })?),
        (None, Some(path)) => Some(parse_code(&code_in_picture(path)?).ok_or_else(|| {
            fail(
                USAGE,
                format!(
                    "the QR code in {} does not hold a whole security code; nothing was compared",
                    path.display()
                ),
            )
        })?),
        (None, None) => None,
    };
    let mut client = unlock::open(cli)?;
    let codes = codes(&client, &args.contact)?;
    let ours = codes[0].1.clone();
    match &theirs {
        None if args.json => {
            json(&code_json(&client, &args.contact, &codes)?);
            Ok(())
        }
        None => {
            if stdout_is_terminal() {
                qr::show(
                    &format!("{CODE_PREFIX}{}", ours.replace(' ', "")),
                    "compare the digits below",
                )?;
            }
            for (_, code) in &codes {
                line(code);
            }
            if codes.len() > 1 {
                note(&format!(
                    "one code per device of {} connected with this device: the code their \
                     device shows must be one of these",
                    args.contact
                ));
            }
            Ok(())
        }
        Some(theirs) => {
            let matched = compare(&mut client, &args.contact, &codes, theirs);
            if args.json {
                json(&serde_json::json!({
                    "contact": args.contact,
                    "match": matched.is_ok(),
                    "verified": matched.is_ok(),
                }));
            }
            matched?;
            note(&format!("codes match: {} is verified", args.contact));
            Ok(())
        }
    }
}

/// The security codes of `contact`'s connections (one per device of
/// theirs, each the same at both of its ends; this device knows only its
/// own, PROTOCOL.md §12.7), by member id, the first connection's first.
/// A usage error if they have not accepted yet.
pub fn codes(client: &Client, contact: &str) -> anyhow::Result<Vec<(String, String)>> {
    let id = client.contact_id(contact)?;
    let mut codes: Vec<(String, String)> = Vec::new();
    for m in client.group_members(&id)? {
        let c = client.contact(&m)?;
        if let Some(code) = c.code().map(|c| c.code) {
            codes.push((m, code));
        }
    }
    if codes.is_empty() {
        return Err(fail(
            USAGE,
            format!("{contact} has not accepted the invitation yet: no code to compare"),
        ));
    }
    Ok(codes)
}

/// What `tern verify --json CONTACT` prints: the code, every code, and
/// whether one of them was verified.
pub fn code_json(
    client: &Client,
    contact: &str,
    codes: &[(String, String)],
) -> anyhow::Result<serde_json::Value> {
    let mut verified = false;
    for (m, _) in codes {
        verified |= client.contact(m)?.code().is_some_and(|r| r.verified);
    }
    Ok(serde_json::json!({
        "contact": contact,
        "code": codes[0].1,
        "codes": codes.iter().map(|(_, c)| c).collect::<Vec<_>>(),
        "verified": verified,
    }))
}

/// Compares `theirs` (digits, from [`parse_code`]) with each code: the
/// connections whose code matches are marked verified; none matching is
/// an error with exit code 4.
pub fn compare(
    client: &mut Client,
    contact: &str,
    codes: &[(String, String)],
    theirs: &str,
) -> anyhow::Result<()> {
    let matching: Vec<&String> = codes
        .iter()
        .filter(|(_, code)| codes_match(code, theirs))
        .map(|(m, _)| m)
        .collect();
    if matching.is_empty() {
        return Err(fail(
            CODE_MISMATCH,
            format!(
                "SECURITY CODES DIFFER for {contact}: the connection may be intercepted. Do not \
                 trust it; make a new invitation in person"
            ),
        ));
    }
    for m in matching {
        client.update_contact(m, |_, c| {
            c.conn.verified = true;
            Ok(())
        })?;
    }
    Ok(())
}

/// The security code in a picture of the QR code `tern verify` shows
/// (`TERN-CODE:` and the digits). A picture without one is a usage error,
/// not a mismatch: it says nothing about the connection.
fn code_in_picture(path: &Path) -> anyhow::Result<String> {
    let text = qr::read_picture(path)
        .map_err(|e| fail(USAGE, e))?
        .ok_or_else(|| {
            fail(
                USAGE,
                format!(
                    "no QR code found in {}: try a sharper, closer picture, or compare the digits",
                    path.display()
                ),
            )
        })?;
    match text.get(..CODE_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(CODE_PREFIX) => Ok(text[CODE_PREFIX.len()..].to_string()),
        _ => Err(fail(
            USAGE,
            format!(
                "the QR code in {} is not a security code (the one `tern verify` shows)",
                path.display()
            ),
        )),
    }
}
