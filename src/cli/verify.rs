//! `tern verify`: compare security codes out of band.

use super::exit::{fail, CODE_MISMATCH, USAGE};
use super::output::{json, line, note, stdout_is_terminal};
use super::{qr, unlock, Cli};
use crate::proto::security_code::codes_match;

/// Show a contact's security code, or compare it with theirs
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  tern verify bob                       # show the code (and its QR code)\n  tern verify bob '12345 67890 …'        # compare with the code Bob reads out\n\nA mismatch exits with status 4: someone may have swapped the invitation."
)]
pub struct Args {
    /// The contact's name (see `tern contacts`)
    pub contact: String,
    /// The code the contact sees: 30 digits; spaces and dashes are ignored
    pub code: Option<String>,
    /// Print one JSON object: the code, or whether the codes match
    #[arg(long)]
    pub json: bool,
}

/// Digits of a code as typed: `Some` only for something that is a code
/// (30 digits, with any spaces and dashes, or the `TERN-CODE:` text of the
/// QR code), so a typo in the command is a usage error, not a mismatch.
fn parse_code(typed: &str) -> Option<String> {
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
    let theirs = match &args.code {
        Some(typed) => Some(parse_code(typed).ok_or_else(|| {
            fail(
                USAGE,
                "that is not a security code: a code is 30 digits in six groups \
                 (`tern verify CONTACT` shows yours); nothing was compared",
            )
        })?),
        None => None,
    };
    let mut client = unlock::open(cli)?;
    let id = client.contact_id(&args.contact)?;
    // Each connection of the contact (one per device of theirs) has its
    // own code, the same at both of its ends; this device knows only its
    // own (PROTOCOL.md §12.7).
    let mut codes: Vec<(String, String)> = Vec::new();
    for m in client.group_members(&id)? {
        let c = client.contact(&m)?;
        if let Some(code) = c.code().map(|c| c.code) {
            codes.push((m, code));
        }
    }
    let Some((_, ours)) = codes.first().cloned() else {
        return Err(fail(
            USAGE,
            format!(
                "{} has not accepted the invitation yet: no code to compare",
                args.contact
            ),
        ));
    };
    match &theirs {
        None if args.json => {
            let mut verified = false;
            for m in client.group_members(&id)? {
                verified |= client.contact(&m)?.code().is_some_and(|r| r.verified);
            }
            json(&serde_json::json!({
                "contact": args.contact,
                "code": ours,
                "codes": codes.iter().map(|(_, c)| c).collect::<Vec<_>>(),
                "verified": verified,
            }));
            Ok(())
        }
        None => {
            if stdout_is_terminal() {
                print!(
                    "{}",
                    qr::terminal(
                        &format!("TERN-CODE:{}", ours.replace(' ', "")),
                        std::env::var_os("NO_COLOR").is_none()
                    )?
                );
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
            let matching: Vec<&String> = codes
                .iter()
                .filter(|(_, code)| codes_match(code, theirs))
                .map(|(m, _)| m)
                .collect();
            let matched = !matching.is_empty();
            if args.json {
                json(&serde_json::json!({
                    "contact": args.contact,
                    "match": matched,
                    "verified": matched,
                }));
            }
            if !matched {
                return Err(fail(
                    CODE_MISMATCH,
                    format!(
                        "SECURITY CODES DIFFER for {}: the connection may be intercepted. Do not trust it; \
                         make a new invitation in person",
                        args.contact
                    ),
                ));
            }
            for m in matching {
                client.update_contact(m, |_, c| {
                    c.conn.verified = true;
                    Ok(())
                })?;
            }
            note(&format!("codes match: {} is verified", args.contact));
            Ok(())
        }
    }
}
