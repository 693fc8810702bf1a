
using namespace System.Management.Automation
using namespace System.Management.Automation.Language

Register-ArgumentCompleter -Native -CommandName 'tern' -ScriptBlock {
    param($wordToComplete, $commandAst, $cursorPosition)

    $commandElements = $commandAst.CommandElements
    $command = @(
        'tern'
        for ($i = 1; $i -lt $commandElements.Count; $i++) {
            $element = $commandElements[$i]
            if ($element -isnot [StringConstantExpressionAst] -or
                $element.StringConstantType -ne [StringConstantType]::BareWord -or
                $element.Value.StartsWith('-') -or
                $element.Value -eq $wordToComplete) {
                break
        }
        $element.Value
    }) -join ';'

    $completions = @(switch ($command) {
        'tern' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help (see more with ''--help'')')
            [CompletionResult]::new('-V', '-V ', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('--version', '--version', [CompletionResultType]::ParameterName, 'Print version')
            [CompletionResult]::new('init', 'init', [CompletionResultType]::ParameterValue, 'Create a profile: display name, relays, and the passphrase that protects it')
            [CompletionResult]::new('invite', 'invite', [CompletionResultType]::ParameterValue, 'Make a one-time invitation: a QR code to show, a link or a PNG file')
            [CompletionResult]::new('invitations', 'invitations', [CompletionResultType]::ParameterValue, 'List the invitations and device links nobody has used yet, or withdraw one')
            [CompletionResult]::new('accept', 'accept', [CompletionResultType]::ParameterValue, 'Accept an invitation given as a link, on stdin, or as a picture of its QR code')
            [CompletionResult]::new('send', 'send', [CompletionResultType]::ParameterValue, 'Send a message: from the arguments, or from stdin when there are none')
            [CompletionResult]::new('recv', 'recv', [CompletionResultType]::ParameterValue, 'Receive messages from every contact (and complete pending connections)')
            [CompletionResult]::new('contacts', 'contacts', [CompletionResultType]::ParameterValue, 'List contacts: state, security level, post-quantum protection, relays and last activity')
            [CompletionResult]::new('verify', 'verify', [CompletionResultType]::ParameterValue, 'Show a contact''s security code, or compare it with theirs')
            [CompletionResult]::new('profile', 'profile', [CompletionResultType]::ParameterValue, 'Show or change your profile; changes are sent to connected contacts')
            [CompletionResult]::new('log', 'log', [CompletionResultType]::ParameterValue, 'Show the local history with a contact, oldest first')
            [CompletionResult]::new('files', 'files', [CompletionResultType]::ParameterValue, 'Files in and out')
            [CompletionResult]::new('forget', 'forget', [CompletionResultType]::ParameterValue, 'Delete a contact on all your devices: its queues, keys and history')
            [CompletionResult]::new('relays', 'relays', [CompletionResultType]::ParameterValue, 'List, add, remove or test your relays')
            [CompletionResult]::new('rotate', 'rotate', [CompletionResultType]::ParameterValue, 'Move connections to fresh queues and keys (both directions)')
            [CompletionResult]::new('key', 'key', [CompletionResultType]::ParameterValue, 'Manage the key that protects the profile')
            [CompletionResult]::new('device', 'device', [CompletionResultType]::ParameterValue, 'Link, list and remove the devices that share this profile')
            [CompletionResult]::new('daemon', 'daemon', [CompletionResultType]::ParameterValue, 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket')
            [CompletionResult]::new('jsonrpc', 'jsonrpc', [CompletionResultType]::ParameterValue, 'Serve the daemon''s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern')
            [CompletionResult]::new('relay', 'relay', [CompletionResultType]::ParameterValue, 'Run a relay, or print the address users add with `tern init --relay`')
            [CompletionResult]::new('generate', 'generate', [CompletionResultType]::ParameterValue, 'Write man pages and shell completions')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;init' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'Your display name, shown to contacts only (never sent to relays)')
            [CompletionResult]::new('--relay', '--relay', [CompletionResultType]::ParameterName, 'A relay to receive messages on (repeat for redundancy; up to 3 are used per connection). Addresses look like tern://KEY@HOST:PORT')
            [CompletionResult]::new('--rotate-days', '--rotate-days', [CompletionResultType]::ParameterName, 'Move each connection to fresh queues about every DAYS days (0: only with `tern rotate`)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--no-passphrase', '--no-passphrase', [CompletionResultType]::ParameterName, 'Keep the profile key unencrypted on disk (no passphrase to type; anyone who can read the home directory can read the profile)')
            [CompletionResult]::new('--isolate', '--isolate', [CompletionResultType]::ParameterName, 'Give every queue a relay session and TCP connection of its own (and, with --proxy, its own SOCKS credentials), so nothing on the wire links two queues on one relay')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;invite' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'What to call the contact [default: their own name, once they accept]')
            [CompletionResult]::new('--rekey', '--rekey', [CompletionResultType]::ParameterName, 'Re-key an existing contact: replace the connection''s keys and queues with ones exchanged through this invitation (useless to anyone else)')
            [CompletionResult]::new('--png', '--png', [CompletionResultType]::ParameterName, 'Write the QR code to a PNG file')
            [CompletionResult]::new('--expires', '--expires', [CompletionResultType]::ParameterName, 'Withdraw the invitation if nobody used it within DURATION (30m, 2h, 7d); see `tern invitations`')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--qr', '--qr', [CompletionResultType]::ParameterName, 'Show a QR code on the terminal (the default when stdout is a terminal and the code fits it; refused, before anything is made, when it cannot fit)')
            [CompletionResult]::new('--link', '--link', [CompletionResultType]::ParameterName, 'Print the link (the default when stdout is not a terminal)')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Replace the --png FILE if it exists')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print one JSON object (link, name, png) instead of the QR code or link')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;invitations' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List them (the default)')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw one: delete its queues on the relays, so that nobody can use it')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;invitations;list' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;invitations;revoke' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;invitations;help' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List them (the default)')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw one: delete its queues on the relays, so that nobody can use it')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;invitations;help;list' {
            break
        }
        'tern;invitations;help;revoke' {
            break
        }
        'tern;invitations;help;help' {
            break
        }
        'tern;accept' {
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'A PNG or JPEG picture (photo or screenshot) of the QR code')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'What to call the contact [default: contact-XXXXXX until the connection completes, then the name they give themselves]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print one JSON object (contact, state) when the request is sent')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;send' {
            [CompletionResult]::new('--file', '--file', [CompletionResultType]::ParameterName, 'Send a file (give it more than once for several; `-` reads standard input, with --name); the message words, if any, are its caption')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'The name the file goes by (required for `--file -`)')
            [CompletionResult]::new('--stall', '--stall', [CompletionResultType]::ParameterName, 'With --file: give up on a relay that makes no progress for SECS (the upload resumes with `tern files retry`)')
            [CompletionResult]::new('--wait-delivered', '--wait-delivered', [CompletionResultType]::ParameterName, 'Wait up to SECS (at most 86400) for a device of the contact to confirm it stored the message; exit 9 if none did in time')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print one JSON object: the message id and whether a relay has it')
            [CompletionResult]::new('--lines', '--lines', [CompletionResultType]::ParameterName, 'Send each line of stdin as a message of its own, as it comes (a log tail, a CSV), in one process; empty lines are skipped')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;recv' {
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'Wait up to SECS for the first message if none is waiting')
            [CompletionResult]::new('--from', '--from', [CompletionResultType]::ParameterName, 'Only this contact')
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]; never over another file')
            [CompletionResult]::new('--max-file-size', '--max-file-size', [CompletionResultType]::ParameterName, 'Offers of larger files are kept, not downloaded (`tern files get ID` takes one): a number of bytes, or with K, M, G [default: 100M]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--follow', '--follow', [CompletionResultType]::ParameterName, 'Keep receiving and printing as messages arrive, until interrupted')
            [CompletionResult]::new('--fail-if-empty', '--fail-if-empty', [CompletionResultType]::ParameterName, 'Exit with status 66 when no message arrived (for scripts: `tern recv --wait 60 --fail-if-empty || echo nothing`)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;contacts' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--long', '--long', [CompletionResultType]::ParameterName, 'Several lines per contact: the name, status and avatar they sent, relays, rotation')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List every contact (the default)')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'One contact in the long form; optionally save the avatar they sent')
            [CompletionResult]::new('rename', 'rename', [CompletionResultType]::ParameterValue, 'Give a contact another name (only here: contacts never see it)')
            [CompletionResult]::new('receipts', 'receipts', [CompletionResultType]::ParameterValue, 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;contacts;list' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--long', '--long', [CompletionResultType]::ParameterName, 'Several lines per contact: the name, status and avatar they sent, relays, rotation')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;contacts;show' {
            [CompletionResult]::new('--save-avatar', '--save-avatar', [CompletionResultType]::ParameterName, 'Write the contact''s avatar (PNG or JPEG) to FILE')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--long', '--long', [CompletionResultType]::ParameterName, 'Several lines per contact: the name, status and avatar they sent, relays, rotation')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Replace FILE if it exists')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;contacts;rename' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;contacts;receipts' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;contacts;help' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List every contact (the default)')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'One contact in the long form; optionally save the avatar they sent')
            [CompletionResult]::new('rename', 'rename', [CompletionResultType]::ParameterValue, 'Give a contact another name (only here: contacts never see it)')
            [CompletionResult]::new('receipts', 'receipts', [CompletionResultType]::ParameterValue, 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;contacts;help;list' {
            break
        }
        'tern;contacts;help;show' {
            break
        }
        'tern;contacts;help;rename' {
            break
        }
        'tern;contacts;help;receipts' {
            break
        }
        'tern;contacts;help;help' {
            break
        }
        'tern;verify' {
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'A picture (photo or screenshot, PNG or JPEG) of the QR code that `tern verify` shows on the contact''s screen, to compare instead of digits')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print one JSON object: the code, or whether the codes match')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;profile' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'Your display name (1 to 64 bytes, no control or format characters)')
            [CompletionResult]::new('--status', '--status', [CompletionResultType]::ParameterName, 'A status line shown to contacts (up to 512 bytes; may span lines)')
            [CompletionResult]::new('--avatar', '--avatar', [CompletionResultType]::ParameterName, 'A PNG or JPEG of at most 11 KiB')
            [CompletionResult]::new('--receipts', '--receipts', [CompletionResultType]::ParameterName, 'Send delivery receipts from this device (on by default; a setting of each device): contacts see which of their messages it stored, never whether you read them. Off: no contact ever sees "delivered" from this device')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--no-avatar', '--no-avatar', [CompletionResultType]::ParameterName, 'Remove the avatar')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'Print the profile as one JSON object')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;log' {
            [CompletionResult]::new('--limit', '--limit', [CompletionResultType]::ParameterName, 'How many of the latest messages')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;files' {
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('get', 'get', [CompletionResultType]::ParameterValue, 'Download an offered file, whatever its size')
            [CompletionResult]::new('cancel', 'cancel', [CompletionResultType]::ParameterValue, 'Stop a file in or out and delete it from the relays')
            [CompletionResult]::new('retry', 'retry', [CompletionResultType]::ParameterValue, 'Go on with an upload or download that stopped')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;files;get' {
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;files;cancel' {
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;files;retry' {
            [CompletionResult]::new('--stall', '--stall', [CompletionResultType]::ParameterName, 'Give up on a relay that makes no progress for this long')
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;files;help' {
            [CompletionResult]::new('get', 'get', [CompletionResultType]::ParameterValue, 'Download an offered file, whatever its size')
            [CompletionResult]::new('cancel', 'cancel', [CompletionResultType]::ParameterValue, 'Stop a file in or out and delete it from the relays')
            [CompletionResult]::new('retry', 'retry', [CompletionResultType]::ParameterValue, 'Go on with an upload or download that stopped')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;files;help;get' {
            break
        }
        'tern;files;help;cancel' {
            break
        }
        'tern;files;help;retry' {
            break
        }
        'tern;files;help;help' {
            break
        }
        'tern;forget' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask for confirmation (needed when stdin is not a terminal)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relays' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (list and test)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List your relays (the default)')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a relay for new connections (after checking that it answers as the key in its address)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Stop using a relay for new connections; connections that receive through it move to your other relays')
            [CompletionResult]::new('test', 'test', [CompletionResultType]::ParameterValue, 'Check that each relay answers and holds the key its address names')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;relays;list' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (list and test)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relays;add' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--no-test', '--no-test', [CompletionResultType]::ParameterName, 'Add it without asking it first (a relay that is not up yet)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (list and test)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relays;remove' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (list and test)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relays;test' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line (list and test)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relays;help' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List your relays (the default)')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a relay for new connections (after checking that it answers as the key in its address)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Stop using a relay for new connections; connections that receive through it move to your other relays')
            [CompletionResult]::new('test', 'test', [CompletionResultType]::ParameterValue, 'Check that each relay answers and holds the key its address names')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;relays;help;list' {
            break
        }
        'tern;relays;help;add' {
            break
        }
        'tern;relays;help;remove' {
            break
        }
        'tern;relays;help;test' {
            break
        }
        'tern;relays;help;help' {
            break
        }
        'tern;rotate' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--all', '--all', [CompletionResultType]::ParameterName, 'Every connected contact')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;key' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('export', 'export', [CompletionResultType]::ParameterValue, 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step')
            [CompletionResult]::new('passwd', 'passwd', [CompletionResultType]::ParameterValue, 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;key;export' {
            [CompletionResult]::new('--out', '--out', [CompletionResultType]::ParameterName, 'Where to write the identity (missing directories are made, 0700)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--force', '--force', [CompletionResultType]::ParameterName, 'Replace FILE if it exists')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;key;passwd' {
            [CompletionResult]::new('--new-passphrase-file', '--new-passphrase-file', [CompletionResultType]::ParameterName, 'Read the new passphrase from the first line of FILE instead of asking twice on the terminal (the current one still comes from TERN_PASSPHRASE_FILE, --passphrase-file or a prompt)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--no-passphrase', '--no-passphrase', [CompletionResultType]::ParameterName, 'Keep the profile key unencrypted on disk from now on')
            [CompletionResult]::new('--rekey', '--rekey', [CompletionResultType]::ParameterName, 'Re-key: a new profile key, with every record re-encrypted under it in one transaction. Old copies of key.age and every identity exported before stop opening the profile (export again after); contacts notice nothing. The new passphrase may equal the old')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;key;help' {
            [CompletionResult]::new('export', 'export', [CompletionResultType]::ParameterValue, 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step')
            [CompletionResult]::new('passwd', 'passwd', [CompletionResultType]::ParameterValue, 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;key;help;export' {
            break
        }
        'tern;key;help;passwd' {
            break
        }
        'tern;key;help;help' {
            break
        }
        'tern;device' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('link', 'link', [CompletionResultType]::ParameterValue, 'Show a one-time device link (QR code or text) for a new device')
            [CompletionResult]::new('confirm', 'confirm', [CompletionResultType]::ParameterValue, 'Link the device that answered a device link shown without --wait')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw a device link nobody should use any more')
            [CompletionResult]::new('join', 'join', [CompletionResultType]::ParameterValue, 'On the new device: join a profile with a device link')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List this profile''s devices')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Cut a device off: it receives nothing new, even if lost or hostile')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;device;link' {
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'Name this device (default: its host name, or the name it has)')
            [CompletionResult]::new('--png', '--png', [CompletionResultType]::ParameterName, 'Write the QR code to a PNG file')
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'Then wait up to SECS for the new device to join and link it (without this, confirm the new device afterwards with `tern device confirm`); a link nobody answered meanwhile is withdrawn')
            [CompletionResult]::new('--expires', '--expires', [CompletionResultType]::ParameterName, 'How long the link stays usable (30s, 10m, 1h; at most 24h)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--qr', '--qr', [CompletionResultType]::ParameterName, 'Show a QR code on the terminal (the default on a terminal)')
            [CompletionResult]::new('--link', '--link', [CompletionResultType]::ParameterName, 'Print the link as text')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;confirm' {
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'Then wait up to SECS for the new device to finish joining')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--yes', '--yes', [CompletionResultType]::ParameterName, 'Do not ask (needed when stdin is not a terminal)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;revoke' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;join' {
            [CompletionResult]::new('--image', '--image', [CompletionResultType]::ParameterName, 'Read the QR code from a picture (PNG or JPEG)')
            [CompletionResult]::new('--name', '--name', [CompletionResultType]::ParameterName, 'This device''s name among your devices (default: its host name)')
            [CompletionResult]::new('--relay', '--relay', [CompletionResultType]::ParameterName, 'A relay for this device''s first queues (repeat), when the linking device''s relays need an access key (tern://KEY:ACCESS@HOST:PORT); the profile''s relay list replaces it once linked')
            [CompletionResult]::new('--wait', '--wait', [CompletionResultType]::ParameterName, 'Then wait up to SECS for the profile, contacts and history (instead of running `tern recv` by hand)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--no-passphrase', '--no-passphrase', [CompletionResultType]::ParameterName, 'For a new --home: keep the profile key unencrypted on disk')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;list' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--json', '--json', [CompletionResultType]::ParameterName, 'One JSON object per line')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;remove' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;device;help' {
            [CompletionResult]::new('link', 'link', [CompletionResultType]::ParameterValue, 'Show a one-time device link (QR code or text) for a new device')
            [CompletionResult]::new('confirm', 'confirm', [CompletionResultType]::ParameterValue, 'Link the device that answered a device link shown without --wait')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw a device link nobody should use any more')
            [CompletionResult]::new('join', 'join', [CompletionResultType]::ParameterValue, 'On the new device: join a profile with a device link')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List this profile''s devices')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Cut a device off: it receives nothing new, even if lost or hostile')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;device;help;link' {
            break
        }
        'tern;device;help;confirm' {
            break
        }
        'tern;device;help;revoke' {
            break
        }
        'tern;device;help;join' {
            break
        }
        'tern;device;help;list' {
            break
        }
        'tern;device;help;remove' {
            break
        }
        'tern;device;help;help' {
            break
        }
        'tern;daemon' {
            [CompletionResult]::new('--socket', '--socket', [CompletionResultType]::ParameterName, 'The socket to listen on [default: $XDG_RUNTIME_DIR/tern/ID.sock, or daemon.sock in the (first) profile]; its directory must be private')
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in each profile]; never over another file')
            [CompletionResult]::new('--max-file-size', '--max-file-size', [CompletionResultType]::ParameterName, 'Offers of larger files are kept, not downloaded (the method `file_get` takes one): a number of bytes, or with K, M, G [default: 100M]')
            [CompletionResult]::new('--homes-dir', '--homes-dir', [CompletionResultType]::ParameterName, 'Serve every profile in this directory (each subdirectory holding one, as `tern init --home DIR/NAME` makes it), beside any --home; profiles added later are served after a restart')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--manual-ack', '--manual-ack', [CompletionResultType]::ParameterName, 'Keep each received message pending (and send it again to every client that subscribes) until a client acknowledges it with `ack`')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;jsonrpc' {
            [CompletionResult]::new('--files-dir', '--files-dir', [CompletionResultType]::ParameterName, 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in each profile]; never over another file')
            [CompletionResult]::new('--max-file-size', '--max-file-size', [CompletionResultType]::ParameterName, 'Offers of larger files are kept, not downloaded (the method `file_get` takes one): a number of bytes, or with K, M, G [default: 100M]')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--manual-ack', '--manual-ack', [CompletionResultType]::ParameterName, 'Keep each received message pending until it is acknowledged with `ack`')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relay' {
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout')
            [CompletionResult]::new('address', 'address', [CompletionResultType]::ParameterValue, 'Print the address of the relay in --data (or in the --store database)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;relay;serve' {
            [CompletionResult]::new('--data', '--data', [CompletionResultType]::ParameterName, 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]')
            [CompletionResult]::new('--access-key-file', '--access-key-file', [CompletionResultType]::ParameterName, 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out')
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port')
            [CompletionResult]::new('--store', '--store', [CompletionResultType]::ParameterName, 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given')
            [CompletionResult]::new('--ttl-days', '--ttl-days', [CompletionResultType]::ParameterName, 'Delete undelivered messages after this many days; a queue unused for as long is deleted too')
            [CompletionResult]::new('--max-pending', '--max-pending', [CompletionResultType]::ParameterName, 'Most messages waiting in one queue; senders get "queue full" past it')
            [CompletionResult]::new('--max-connections', '--max-connections', [CompletionResultType]::ParameterName, 'Most simultaneous connections')
            [CompletionResult]::new('--max-connections-per-address', '--max-connections-per-address', [CompletionResultType]::ParameterName, 'Most simultaneous connections from one address (an IPv6 /64)')
            [CompletionResult]::new('--max-data-mib', '--max-data-mib', [CompletionResultType]::ParameterName, 'Beyond this database size, in MiB, new queues and messages are refused ("temporarily unavailable") until deliveries make room')
            [CompletionResult]::new('--max-open-queues', '--max-open-queues', [CompletionResultType]::ParameterName, 'Most queues created without an access key, in all')
            [CompletionResult]::new('--unsecured-days', '--unsecured-days', [CompletionResultType]::ParameterName, 'Days a queue that was never secured lives: an invitation must be answered within it (0: no limit of its own; like every queue it still goes once unused for --ttl-days)')
            [CompletionResult]::new('--public-address', '--public-address', [CompletionResultType]::ParameterName, 'The host clients reach this relay at, when it is not the listen address: HOST[:PORT] (behind NAT, on 0.0.0.0), or https://HOST[:PORT][/PATH] behind an HTTPS front; remembered in --data for `tern relay address`')
            [CompletionResult]::new('--forwarded-header', '--forwarded-header', [CompletionResultType]::ParameterName, 'Behind a reverse proxy or PaaS router you trust: the header it puts the client''s address in (X-Forwarded-For), so that the per-address limits count clients rather than the front')
            [CompletionResult]::new('--workers', '--workers', [CompletionResultType]::ParameterName, 'Threads that run handshakes and execute commands')
            [CompletionResult]::new('--create-rate-per-connection', '--create-rate-per-connection', [CompletionResultType]::ParameterName, 'Queues one connection may create: BURST/PER_MINUTE')
            [CompletionResult]::new('--create-rate-per-address', '--create-rate-per-address', [CompletionResultType]::ParameterName, 'Queues one address (an IPv6 /64) may create: BURST/PER_MINUTE')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relay;address' {
            [CompletionResult]::new('--data', '--data', [CompletionResultType]::ParameterName, 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]')
            [CompletionResult]::new('--access-key-file', '--access-key-file', [CompletionResultType]::ParameterName, 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out')
            [CompletionResult]::new('--listen', '--listen', [CompletionResultType]::ParameterName, 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port')
            [CompletionResult]::new('--store', '--store', [CompletionResultType]::ParameterName, 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given')
            [CompletionResult]::new('--public-address', '--public-address', [CompletionResultType]::ParameterName, 'With --store: the host clients reach the relay at, HOST[:PORT] or https://HOST[:PORT][/PATH] (a database remembers no address; a relay under --data remembers the one it printed)')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;relay;help' {
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout')
            [CompletionResult]::new('address', 'address', [CompletionResultType]::ParameterValue, 'Print the address of the relay in --data (or in the --store database)')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;relay;help;serve' {
            break
        }
        'tern;relay;help;address' {
            break
        }
        'tern;relay;help;help' {
            break
        }
        'tern;generate' {
            [CompletionResult]::new('--out', '--out', [CompletionResultType]::ParameterName, 'Directory to write man/ and completions/ into')
            [CompletionResult]::new('--home', '--home', [CompletionResultType]::ParameterName, 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles')
            [CompletionResult]::new('--passphrase-file', '--passphrase-file', [CompletionResultType]::ParameterName, 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)')
            [CompletionResult]::new('--identity', '--identity', [CompletionResultType]::ParameterName, 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)')
            [CompletionResult]::new('--proxy', '--proxy', [CompletionResultType]::ParameterName, 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)')
            [CompletionResult]::new('--allow-weak-passphrase', '--allow-weak-passphrase', [CompletionResultType]::ParameterName, 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess')
            [CompletionResult]::new('-h', '-h', [CompletionResultType]::ParameterName, 'Print help')
            [CompletionResult]::new('--help', '--help', [CompletionResultType]::ParameterName, 'Print help')
            break
        }
        'tern;help' {
            [CompletionResult]::new('init', 'init', [CompletionResultType]::ParameterValue, 'Create a profile: display name, relays, and the passphrase that protects it')
            [CompletionResult]::new('invite', 'invite', [CompletionResultType]::ParameterValue, 'Make a one-time invitation: a QR code to show, a link or a PNG file')
            [CompletionResult]::new('invitations', 'invitations', [CompletionResultType]::ParameterValue, 'List the invitations and device links nobody has used yet, or withdraw one')
            [CompletionResult]::new('accept', 'accept', [CompletionResultType]::ParameterValue, 'Accept an invitation given as a link, on stdin, or as a picture of its QR code')
            [CompletionResult]::new('send', 'send', [CompletionResultType]::ParameterValue, 'Send a message: from the arguments, or from stdin when there are none')
            [CompletionResult]::new('recv', 'recv', [CompletionResultType]::ParameterValue, 'Receive messages from every contact (and complete pending connections)')
            [CompletionResult]::new('contacts', 'contacts', [CompletionResultType]::ParameterValue, 'List contacts: state, security level, post-quantum protection, relays and last activity')
            [CompletionResult]::new('verify', 'verify', [CompletionResultType]::ParameterValue, 'Show a contact''s security code, or compare it with theirs')
            [CompletionResult]::new('profile', 'profile', [CompletionResultType]::ParameterValue, 'Show or change your profile; changes are sent to connected contacts')
            [CompletionResult]::new('log', 'log', [CompletionResultType]::ParameterValue, 'Show the local history with a contact, oldest first')
            [CompletionResult]::new('files', 'files', [CompletionResultType]::ParameterValue, 'Files in and out')
            [CompletionResult]::new('forget', 'forget', [CompletionResultType]::ParameterValue, 'Delete a contact on all your devices: its queues, keys and history')
            [CompletionResult]::new('relays', 'relays', [CompletionResultType]::ParameterValue, 'List, add, remove or test your relays')
            [CompletionResult]::new('rotate', 'rotate', [CompletionResultType]::ParameterValue, 'Move connections to fresh queues and keys (both directions)')
            [CompletionResult]::new('key', 'key', [CompletionResultType]::ParameterValue, 'Manage the key that protects the profile')
            [CompletionResult]::new('device', 'device', [CompletionResultType]::ParameterValue, 'Link, list and remove the devices that share this profile')
            [CompletionResult]::new('daemon', 'daemon', [CompletionResultType]::ParameterValue, 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket')
            [CompletionResult]::new('jsonrpc', 'jsonrpc', [CompletionResultType]::ParameterValue, 'Serve the daemon''s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern')
            [CompletionResult]::new('relay', 'relay', [CompletionResultType]::ParameterValue, 'Run a relay, or print the address users add with `tern init --relay`')
            [CompletionResult]::new('generate', 'generate', [CompletionResultType]::ParameterValue, 'Write man pages and shell completions')
            [CompletionResult]::new('help', 'help', [CompletionResultType]::ParameterValue, 'Print this message or the help of the given subcommand(s)')
            break
        }
        'tern;help;init' {
            break
        }
        'tern;help;invite' {
            break
        }
        'tern;help;invitations' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List them (the default)')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw one: delete its queues on the relays, so that nobody can use it')
            break
        }
        'tern;help;invitations;list' {
            break
        }
        'tern;help;invitations;revoke' {
            break
        }
        'tern;help;accept' {
            break
        }
        'tern;help;send' {
            break
        }
        'tern;help;recv' {
            break
        }
        'tern;help;contacts' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List every contact (the default)')
            [CompletionResult]::new('show', 'show', [CompletionResultType]::ParameterValue, 'One contact in the long form; optionally save the avatar they sent')
            [CompletionResult]::new('rename', 'rename', [CompletionResultType]::ParameterValue, 'Give a contact another name (only here: contacts never see it)')
            [CompletionResult]::new('receipts', 'receipts', [CompletionResultType]::ParameterValue, 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"')
            break
        }
        'tern;help;contacts;list' {
            break
        }
        'tern;help;contacts;show' {
            break
        }
        'tern;help;contacts;rename' {
            break
        }
        'tern;help;contacts;receipts' {
            break
        }
        'tern;help;verify' {
            break
        }
        'tern;help;profile' {
            break
        }
        'tern;help;log' {
            break
        }
        'tern;help;files' {
            [CompletionResult]::new('get', 'get', [CompletionResultType]::ParameterValue, 'Download an offered file, whatever its size')
            [CompletionResult]::new('cancel', 'cancel', [CompletionResultType]::ParameterValue, 'Stop a file in or out and delete it from the relays')
            [CompletionResult]::new('retry', 'retry', [CompletionResultType]::ParameterValue, 'Go on with an upload or download that stopped')
            break
        }
        'tern;help;files;get' {
            break
        }
        'tern;help;files;cancel' {
            break
        }
        'tern;help;files;retry' {
            break
        }
        'tern;help;forget' {
            break
        }
        'tern;help;relays' {
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List your relays (the default)')
            [CompletionResult]::new('add', 'add', [CompletionResultType]::ParameterValue, 'Add a relay for new connections (after checking that it answers as the key in its address)')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Stop using a relay for new connections; connections that receive through it move to your other relays')
            [CompletionResult]::new('test', 'test', [CompletionResultType]::ParameterValue, 'Check that each relay answers and holds the key its address names')
            break
        }
        'tern;help;relays;list' {
            break
        }
        'tern;help;relays;add' {
            break
        }
        'tern;help;relays;remove' {
            break
        }
        'tern;help;relays;test' {
            break
        }
        'tern;help;rotate' {
            break
        }
        'tern;help;key' {
            [CompletionResult]::new('export', 'export', [CompletionResultType]::ParameterValue, 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step')
            [CompletionResult]::new('passwd', 'passwd', [CompletionResultType]::ParameterValue, 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key')
            break
        }
        'tern;help;key;export' {
            break
        }
        'tern;help;key;passwd' {
            break
        }
        'tern;help;device' {
            [CompletionResult]::new('link', 'link', [CompletionResultType]::ParameterValue, 'Show a one-time device link (QR code or text) for a new device')
            [CompletionResult]::new('confirm', 'confirm', [CompletionResultType]::ParameterValue, 'Link the device that answered a device link shown without --wait')
            [CompletionResult]::new('revoke', 'revoke', [CompletionResultType]::ParameterValue, 'Withdraw a device link nobody should use any more')
            [CompletionResult]::new('join', 'join', [CompletionResultType]::ParameterValue, 'On the new device: join a profile with a device link')
            [CompletionResult]::new('list', 'list', [CompletionResultType]::ParameterValue, 'List this profile''s devices')
            [CompletionResult]::new('remove', 'remove', [CompletionResultType]::ParameterValue, 'Cut a device off: it receives nothing new, even if lost or hostile')
            break
        }
        'tern;help;device;link' {
            break
        }
        'tern;help;device;confirm' {
            break
        }
        'tern;help;device;revoke' {
            break
        }
        'tern;help;device;join' {
            break
        }
        'tern;help;device;list' {
            break
        }
        'tern;help;device;remove' {
            break
        }
        'tern;help;daemon' {
            break
        }
        'tern;help;jsonrpc' {
            break
        }
        'tern;help;relay' {
            [CompletionResult]::new('serve', 'serve', [CompletionResultType]::ParameterValue, 'Serve until SIGTERM or SIGINT; prints the relay''s address on the first line of stdout')
            [CompletionResult]::new('address', 'address', [CompletionResultType]::ParameterValue, 'Print the address of the relay in --data (or in the --store database)')
            break
        }
        'tern;help;relay;serve' {
            break
        }
        'tern;help;relay;address' {
            break
        }
        'tern;help;generate' {
            break
        }
        'tern;help;help' {
            break
        }
    })

    $completions.Where{ $_.CompletionText -like "$wordToComplete*" } |
        Sort-Object -Property ListItemText
}
