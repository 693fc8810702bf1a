# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_tern_global_optspecs
    string join \n home= passphrase-file= identity= proxy= allow-weak-passphrase h/help V/version
end

function __fish_tern_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_tern_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_tern_using_subcommand
    set -l cmd (__fish_tern_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c tern -n "__fish_tern_needs_command" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_needs_command" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_needs_command" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_needs_command" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_needs_command" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c tern -n "__fish_tern_needs_command" -s V -l version -d 'Print version'
complete -c tern -n "__fish_tern_needs_command" -f -a "init" -d 'Create a profile: display name, relays, and the passphrase that protects it'
complete -c tern -n "__fish_tern_needs_command" -f -a "invite" -d 'Make a one-time invitation: a QR code to show, a link or a PNG file'
complete -c tern -n "__fish_tern_needs_command" -f -a "invitations" -d 'List the invitations and device links nobody has used yet, or withdraw one'
complete -c tern -n "__fish_tern_needs_command" -f -a "accept" -d 'Accept an invitation given as a link, on stdin, or as a picture of its QR code'
complete -c tern -n "__fish_tern_needs_command" -f -a "send" -d 'Send a message: from the arguments, or from stdin when there are none'
complete -c tern -n "__fish_tern_needs_command" -f -a "recv" -d 'Receive messages from every contact (and complete pending connections)'
complete -c tern -n "__fish_tern_needs_command" -f -a "contacts" -d 'List contacts: state, security level, post-quantum protection, relays and last activity'
complete -c tern -n "__fish_tern_needs_command" -f -a "verify" -d 'Show a contact\'s security code, or compare it with theirs'
complete -c tern -n "__fish_tern_needs_command" -f -a "profile" -d 'Show or change your profile; changes are sent to connected contacts'
complete -c tern -n "__fish_tern_needs_command" -f -a "log" -d 'Show the local history with a contact, oldest first'
complete -c tern -n "__fish_tern_needs_command" -f -a "files" -d 'Files in and out'
complete -c tern -n "__fish_tern_needs_command" -f -a "forget" -d 'Delete a contact on all your devices: its queues, keys and history'
complete -c tern -n "__fish_tern_needs_command" -f -a "relays" -d 'List, add, remove or test your relays'
complete -c tern -n "__fish_tern_needs_command" -f -a "rotate" -d 'Move connections to fresh queues and keys (both directions)'
complete -c tern -n "__fish_tern_needs_command" -f -a "key" -d 'Manage the key that protects the profile'
complete -c tern -n "__fish_tern_needs_command" -f -a "device" -d 'Link, list and remove the devices that share this profile'
complete -c tern -n "__fish_tern_needs_command" -f -a "daemon" -d 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket'
complete -c tern -n "__fish_tern_needs_command" -f -a "jsonrpc" -d 'Serve the daemon\'s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern'
complete -c tern -n "__fish_tern_needs_command" -f -a "relay" -d 'Run a relay, or print the address users add with `tern init --relay`'
complete -c tern -n "__fish_tern_needs_command" -f -a "generate" -d 'Write man pages and shell completions'
complete -c tern -n "__fish_tern_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand init" -l name -d 'Your display name, shown to contacts only (never sent to relays)' -r
complete -c tern -n "__fish_tern_using_subcommand init" -l relay -d 'A relay to receive messages on (repeat for redundancy; up to 3 are used per connection). Addresses look like tern://KEY@HOST:PORT' -r
complete -c tern -n "__fish_tern_using_subcommand init" -l rotate-days -d 'Move each connection to fresh queues about every DAYS days (0: only with `tern rotate`)' -r
complete -c tern -n "__fish_tern_using_subcommand init" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand init" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand init" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand init" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand init" -l no-passphrase -d 'Keep the profile key unencrypted on disk (no passphrase to type; anyone who can read the home directory can read the profile)'
complete -c tern -n "__fish_tern_using_subcommand init" -l isolate -d 'Give every queue a relay session and TCP connection of its own (and, with --proxy, its own SOCKS credentials), so nothing on the wire links two queues on one relay'
complete -c tern -n "__fish_tern_using_subcommand init" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand init" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand invite" -l name -d 'What to call the contact [default: their own name, once they accept]' -r
complete -c tern -n "__fish_tern_using_subcommand invite" -l rekey -d 'Re-key an existing contact: replace the connection\'s keys and queues with ones exchanged through this invitation (useless to anyone else)' -r
complete -c tern -n "__fish_tern_using_subcommand invite" -l png -d 'Write the QR code to a PNG file' -r -F
complete -c tern -n "__fish_tern_using_subcommand invite" -l expires -d 'Withdraw the invitation if nobody used it within DURATION (30m, 2h, 7d); see `tern invitations`' -r
complete -c tern -n "__fish_tern_using_subcommand invite" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand invite" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invite" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invite" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand invite" -l qr -d 'Show a QR code on the terminal (the default when stdout is a terminal and the code fits it; refused, before anything is made, when it cannot fit)'
complete -c tern -n "__fish_tern_using_subcommand invite" -l link -d 'Print the link (the default when stdout is not a terminal)'
complete -c tern -n "__fish_tern_using_subcommand invite" -l force -d 'Replace the --png FILE if it exists'
complete -c tern -n "__fish_tern_using_subcommand invite" -l json -d 'Print one JSON object (link, name, png) instead of the QR code or link'
complete -c tern -n "__fish_tern_using_subcommand invite" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand invite" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -f -a "list" -d 'List them (the default)'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -f -a "revoke" -d 'Withdraw one: delete its queues on the relays, so that nobody can use it'
complete -c tern -n "__fish_tern_using_subcommand invitations; and not __fish_seen_subcommand_from list revoke help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from revoke" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from help" -f -a "list" -d 'List them (the default)'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from help" -f -a "revoke" -d 'Withdraw one: delete its queues on the relays, so that nobody can use it'
complete -c tern -n "__fish_tern_using_subcommand invitations; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand accept" -l image -d 'A PNG or JPEG picture (photo or screenshot) of the QR code' -r -F
complete -c tern -n "__fish_tern_using_subcommand accept" -l name -d 'What to call the contact [default: contact-XXXXXX until the connection completes, then the name they give themselves]' -r
complete -c tern -n "__fish_tern_using_subcommand accept" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand accept" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand accept" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand accept" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand accept" -l json -d 'Print one JSON object (contact, state) when the request is sent'
complete -c tern -n "__fish_tern_using_subcommand accept" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand accept" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand send" -l file -d 'Send a file (give it more than once for several; `-` reads standard input, with --name); the message words, if any, are its caption' -r -F
complete -c tern -n "__fish_tern_using_subcommand send" -l name -d 'The name the file goes by (required for `--file -`)' -r
complete -c tern -n "__fish_tern_using_subcommand send" -l stall -d 'With --file: give up on a relay that makes no progress for SECS (the upload resumes with `tern files retry`)' -r
complete -c tern -n "__fish_tern_using_subcommand send" -l wait-delivered -d 'Wait up to SECS (at most 86400) for a device of the contact to confirm it stored the message; exit 9 if none did in time' -r
complete -c tern -n "__fish_tern_using_subcommand send" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand send" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand send" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand send" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand send" -l json -d 'Print one JSON object: the message id and whether a relay has it'
complete -c tern -n "__fish_tern_using_subcommand send" -l lines -d 'Send each line of stdin as a message of its own, as it comes (a log tail, a CSV), in one process; empty lines are skipped'
complete -c tern -n "__fish_tern_using_subcommand send" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand send" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand recv" -l wait -d 'Wait up to SECS for the first message if none is waiting' -r
complete -c tern -n "__fish_tern_using_subcommand recv" -l from -d 'Only this contact' -r
complete -c tern -n "__fish_tern_using_subcommand recv" -l files-dir -d 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]; never over another file' -r -F
complete -c tern -n "__fish_tern_using_subcommand recv" -l max-file-size -d 'Offers of larger files are kept, not downloaded (`tern files get ID` takes one): a number of bytes, or with K, M, G [default: 100M]' -r
complete -c tern -n "__fish_tern_using_subcommand recv" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand recv" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand recv" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand recv" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand recv" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand recv" -l follow -d 'Keep receiving and printing as messages arrive, until interrupted'
complete -c tern -n "__fish_tern_using_subcommand recv" -l fail-if-empty -d 'Exit with status 66 when no message arrived (for scripts: `tern recv --wait 60 --fail-if-empty || echo nothing`)'
complete -c tern -n "__fish_tern_using_subcommand recv" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand recv" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l long -d 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -a "list" -d 'List every contact (the default)'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -a "show" -d 'One contact in the long form; optionally save the avatar they sent'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -a "rename" -d 'Give a contact another name (only here: contacts never see it)'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -a "receipts" -d 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
complete -c tern -n "__fish_tern_using_subcommand contacts; and not __fish_seen_subcommand_from list show rename receipts help" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l long -d 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l save-avatar -d 'Write the contact\'s avatar (PNG or JPEG) to FILE' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l long -d 'Several lines per contact: the name, status and avatar they sent, relays, rotation'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l force -d 'Replace FILE if it exists'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from rename" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from receipts" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from help" -f -a "list" -d 'List every contact (the default)'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from help" -f -a "show" -d 'One contact in the long form; optionally save the avatar they sent'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from help" -f -a "rename" -d 'Give a contact another name (only here: contacts never see it)'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from help" -f -a "receipts" -d 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
complete -c tern -n "__fish_tern_using_subcommand contacts; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand verify" -l image -d 'A picture (photo or screenshot, PNG or JPEG) of the QR code that `tern verify` shows on the contact\'s screen, to compare instead of digits' -r -F
complete -c tern -n "__fish_tern_using_subcommand verify" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand verify" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand verify" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand verify" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand verify" -l json -d 'Print one JSON object: the code, or whether the codes match'
complete -c tern -n "__fish_tern_using_subcommand verify" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand verify" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand profile" -l name -d 'Your display name (1 to 64 bytes, no control or format characters)' -r
complete -c tern -n "__fish_tern_using_subcommand profile" -l status -d 'A status line shown to contacts (up to 512 bytes; may span lines)' -r
complete -c tern -n "__fish_tern_using_subcommand profile" -l avatar -d 'A PNG or JPEG of at most 11 KiB' -r -F
complete -c tern -n "__fish_tern_using_subcommand profile" -l receipts -d 'Send delivery receipts from this device (on by default; a setting of each device): contacts see which of their messages it stored, never whether you read them. Off: no contact ever sees "delivered" from this device' -r
complete -c tern -n "__fish_tern_using_subcommand profile" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand profile" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand profile" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand profile" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand profile" -l no-avatar -d 'Remove the avatar'
complete -c tern -n "__fish_tern_using_subcommand profile" -l json -d 'Print the profile as one JSON object'
complete -c tern -n "__fish_tern_using_subcommand profile" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand profile" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand log" -l limit -d 'How many of the latest messages' -r
complete -c tern -n "__fish_tern_using_subcommand log" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand log" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand log" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand log" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand log" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand log" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand log" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l files-dir -d 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -f -a "get" -d 'Download an offered file, whatever its size'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -f -a "cancel" -d 'Stop a file in or out and delete it from the relays'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -f -a "retry" -d 'Go on with an upload or download that stopped'
complete -c tern -n "__fish_tern_using_subcommand files; and not __fish_seen_subcommand_from get cancel retry help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l files-dir -d 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from get" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l files-dir -d 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from cancel" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l stall -d 'Give up on a relay that makes no progress for this long' -r
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l files-dir -d 'Where received files are saved [default: $XDG_DOWNLOAD_DIR/tern, or downloads/ in the profile]' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from retry" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from help" -f -a "get" -d 'Download an offered file, whatever its size'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from help" -f -a "cancel" -d 'Stop a file in or out and delete it from the relays'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from help" -f -a "retry" -d 'Go on with an upload or download that stopped'
complete -c tern -n "__fish_tern_using_subcommand files; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand forget" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand forget" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand forget" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand forget" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand forget" -l yes -d 'Do not ask for confirmation (needed when stdin is not a terminal)'
complete -c tern -n "__fish_tern_using_subcommand forget" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand forget" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l json -d 'One JSON object per line (list and test)'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -f -a "list" -d 'List your relays (the default)'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -f -a "add" -d 'Add a relay for new connections (after checking that it answers as the key in its address)'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -f -a "remove" -d 'Stop using a relay for new connections; connections that receive through it move to your other relays'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -f -a "test" -d 'Check that each relay answers and holds the key its address names'
complete -c tern -n "__fish_tern_using_subcommand relays; and not __fish_seen_subcommand_from list add remove test help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l json -d 'One JSON object per line (list and test)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l no-test -d 'Add it without asking it first (a relay that is not up yet)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l json -d 'One JSON object per line (list and test)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l json -d 'One JSON object per line (list and test)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from remove" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l json -d 'One JSON object per line (list and test)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from test" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from help" -f -a "list" -d 'List your relays (the default)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from help" -f -a "add" -d 'Add a relay for new connections (after checking that it answers as the key in its address)'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from help" -f -a "remove" -d 'Stop using a relay for new connections; connections that receive through it move to your other relays'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from help" -f -a "test" -d 'Check that each relay answers and holds the key its address names'
complete -c tern -n "__fish_tern_using_subcommand relays; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand rotate" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand rotate" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand rotate" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand rotate" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand rotate" -l all -d 'Every connected contact'
complete -c tern -n "__fish_tern_using_subcommand rotate" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand rotate" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -f -a "export" -d 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -f -a "passwd" -d 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
complete -c tern -n "__fish_tern_using_subcommand key; and not __fish_seen_subcommand_from export passwd help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l out -d 'Where to write the identity (missing directories are made, 0700)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l force -d 'Replace FILE if it exists'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from export" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l new-passphrase-file -d 'Read the new passphrase from the first line of FILE instead of asking twice on the terminal (the current one still comes from TERN_PASSPHRASE_FILE, --passphrase-file or a prompt)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l no-passphrase -d 'Keep the profile key unencrypted on disk from now on'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l rekey -d 'Re-key: a new profile key, with every record re-encrypted under it in one transaction. Old copies of key.age and every identity exported before stop opening the profile (export again after); contacts notice nothing. The new passphrase may equal the old'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from passwd" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from help" -f -a "export" -d 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from help" -f -a "passwd" -d 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
complete -c tern -n "__fish_tern_using_subcommand key; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "link" -d 'Show a one-time device link (QR code or text) for a new device'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "confirm" -d 'Link the device that answered a device link shown without --wait'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "revoke" -d 'Withdraw a device link nobody should use any more'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "join" -d 'On the new device: join a profile with a device link'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "list" -d 'List this profile\'s devices'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "remove" -d 'Cut a device off: it receives nothing new, even if lost or hostile'
complete -c tern -n "__fish_tern_using_subcommand device; and not __fish_seen_subcommand_from link confirm revoke join list remove help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l name -d 'Name this device (default: its host name, or the name it has)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l png -d 'Write the QR code to a PNG file' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l wait -d 'Then wait up to SECS for the new device to join and link it (without this, confirm the new device afterwards with `tern device confirm`); a link nobody answered meanwhile is withdrawn' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l expires -d 'How long the link stays usable (30s, 10m, 1h; at most 24h)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l qr -d 'Show a QR code on the terminal (the default on a terminal)'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l link -d 'Print the link as text'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from link" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l wait -d 'Then wait up to SECS for the new device to finish joining' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l yes -d 'Do not ask (needed when stdin is not a terminal)'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from confirm" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from revoke" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l image -d 'Read the QR code from a picture (PNG or JPEG)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l name -d 'This device\'s name among your devices (default: its host name)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l relay -d 'A relay for this device\'s first queues (repeat), when the linking device\'s relays need an access key (tern://KEY:ACCESS@HOST:PORT); the profile\'s relay list replaces it once linked' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l wait -d 'Then wait up to SECS for the profile, contacts and history (instead of running `tern recv` by hand)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l no-passphrase -d 'For a new --home: keep the profile key unencrypted on disk'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from join" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l json -d 'One JSON object per line'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from remove" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "link" -d 'Show a one-time device link (QR code or text) for a new device'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "confirm" -d 'Link the device that answered a device link shown without --wait'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "revoke" -d 'Withdraw a device link nobody should use any more'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "join" -d 'On the new device: join a profile with a device link'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "list" -d 'List this profile\'s devices'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "remove" -d 'Cut a device off: it receives nothing new, even if lost or hostile'
complete -c tern -n "__fish_tern_using_subcommand device; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand daemon" -l socket -d 'The socket to listen on [default: $XDG_RUNTIME_DIR/tern/ID.sock, or daemon.sock in the (first) profile]; its directory must be private' -r -F
complete -c tern -n "__fish_tern_using_subcommand daemon" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand daemon" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand daemon" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand daemon" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand daemon" -l manual-ack -d 'Keep each received message pending (and send it again to every client that subscribes) until a client acknowledges it with `ack`'
complete -c tern -n "__fish_tern_using_subcommand daemon" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand daemon" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l manual-ack -d 'Keep each received message pending until it is acknowledged with `ack`'
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand jsonrpc" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -f -a "serve" -d 'Serve until SIGTERM or SIGINT; prints the relay\'s address on the first line of stdout'
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -f -a "address" -d 'Print the address of the relay in --data (or in the --store database)'
complete -c tern -n "__fish_tern_using_subcommand relay; and not __fish_seen_subcommand_from serve address help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l data -d 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l access-key-file -d 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l listen -d 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l store -d 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l ttl-days -d 'Delete undelivered messages after this many days; a queue unused for as long is deleted too' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l max-pending -d 'Most messages waiting in one queue; senders get "queue full" past it' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l max-connections -d 'Most simultaneous connections' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l max-connections-per-address -d 'Most simultaneous connections from one address (an IPv6 /64)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l max-data-mib -d 'Beyond this database size, in MiB, new queues and messages are refused ("temporarily unavailable") until deliveries make room' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l max-open-queues -d 'Most queues created without an access key, in all' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l unsecured-days -d 'Days a queue that was never secured lives: an invitation must be answered within it (0: no limit of its own; like every queue it still goes once unused for --ttl-days)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l public-address -d 'The host clients reach this relay at, when it is not the listen address: HOST[:PORT] (behind NAT, on 0.0.0.0), or https://HOST[:PORT][/PATH] behind an HTTPS front; remembered in --data for `tern relay address`' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l forwarded-header -d 'Behind a reverse proxy or PaaS router you trust: the header it puts the client\'s address in (X-Forwarded-For), so that the per-address limits count clients rather than the front' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l workers -d 'Threads that run handshakes and execute commands' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l create-rate-per-connection -d 'Queues one connection may create: BURST/PER_MINUTE' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l create-rate-per-address -d 'Queues one address (an IPv6 /64) may create: BURST/PER_MINUTE' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from serve" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l data -d 'Where the relay keeps its identity key and queues [default: $XDG_DATA_HOME/tern-relay or ~/.local/share/tern-relay]' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l access-key-file -d 'A file of access keys needed to create queues (sending never needs one): one key a line, optionally followed by the most queues it may have; the first key becomes part of the address you hand out' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l listen -d 'Address and port to listen on; the PORT environment variable, as set by container platforms, overrides the port' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l store -d 'Keep the queues and the identity key in this PostgreSQL database (postgres://USER:PASSWORD@HOST:PORT/DATABASE) instead of SQLite under --data; every relay started with the same database serves as one relay. DATABASE_URL, as PaaS add-ons set it, is read when not given' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l public-address -d 'With --store: the host clients reach the relay at, HOST[:PORT] or https://HOST[:PORT][/PATH] (a database remembers no address; a relay under --data remembers the one it printed)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from address" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from help" -f -a "serve" -d 'Serve until SIGTERM or SIGINT; prints the relay\'s address on the first line of stdout'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from help" -f -a "address" -d 'Print the address of the relay in --data (or in the --store database)'
complete -c tern -n "__fish_tern_using_subcommand relay; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand generate" -l out -d 'Directory to write man/ and completions/ into' -r -F
complete -c tern -n "__fish_tern_using_subcommand generate" -l home -d 'Profile directory [default: $XDG_DATA_HOME/tern or ~/.local/share/tern]; `tern daemon` and `tern jsonrpc` take it more than once, to serve several profiles' -r -F
complete -c tern -n "__fish_tern_using_subcommand generate" -l passphrase-file -d 'Read the passphrase from the first line of FILE (for scripts; the TERN_PASSPHRASE variable works too)' -r -F
complete -c tern -n "__fish_tern_using_subcommand generate" -l identity -d 'Unlock with an identity file written by `tern key export` instead of the passphrase (fast, for cron jobs)' -r -F
complete -c tern -n "__fish_tern_using_subcommand generate" -l proxy -d 'Connect to relays through this SOCKS5 proxy, such as Tor: socks5h://HOST:PORT resolves relay host names at the proxy (with --isolate, each queue gets credentials of its own, so Tor keeps them on separate circuits)' -r
complete -c tern -n "__fish_tern_using_subcommand generate" -l allow-weak-passphrase -d 'Accept a new passphrase that the strength check (zxcvbn) finds easy to guess'
complete -c tern -n "__fish_tern_using_subcommand generate" -s h -l help -d 'Print help'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "init" -d 'Create a profile: display name, relays, and the passphrase that protects it'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "invite" -d 'Make a one-time invitation: a QR code to show, a link or a PNG file'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "invitations" -d 'List the invitations and device links nobody has used yet, or withdraw one'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "accept" -d 'Accept an invitation given as a link, on stdin, or as a picture of its QR code'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "send" -d 'Send a message: from the arguments, or from stdin when there are none'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "recv" -d 'Receive messages from every contact (and complete pending connections)'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "contacts" -d 'List contacts: state, security level, post-quantum protection, relays and last activity'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "verify" -d 'Show a contact\'s security code, or compare it with theirs'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "profile" -d 'Show or change your profile; changes are sent to connected contacts'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "log" -d 'Show the local history with a contact, oldest first'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "files" -d 'Files in and out'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "forget" -d 'Delete a contact on all your devices: its queues, keys and history'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "relays" -d 'List, add, remove or test your relays'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "rotate" -d 'Move connections to fresh queues and keys (both directions)'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "key" -d 'Manage the key that protects the profile'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "device" -d 'Link, list and remove the devices that share this profile'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "daemon" -d 'Serve profiles to bots and scripts: JSON-RPC 2.0 on a Unix socket'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "jsonrpc" -d 'Serve the daemon\'s JSON-RPC 2.0 on stdin and stdout, for programs that spawn tern'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "relay" -d 'Run a relay, or print the address users add with `tern init --relay`'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "generate" -d 'Write man pages and shell completions'
complete -c tern -n "__fish_tern_using_subcommand help; and not __fish_seen_subcommand_from init invite invitations accept send recv contacts verify profile log files forget relays rotate key device daemon jsonrpc relay generate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from invitations" -f -a "list" -d 'List them (the default)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from invitations" -f -a "revoke" -d 'Withdraw one: delete its queues on the relays, so that nobody can use it'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from contacts" -f -a "list" -d 'List every contact (the default)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from contacts" -f -a "show" -d 'One contact in the long form; optionally save the avatar they sent'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from contacts" -f -a "rename" -d 'Give a contact another name (only here: contacts never see it)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from contacts" -f -a "receipts" -d 'Show, or turn on or off, the delivery receipts this device sends a contact (on by default; `tern profile --receipts off` turns them off for every contact). Off: that contact never sees "delivered"'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from files" -f -a "get" -d 'Download an offered file, whatever its size'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from files" -f -a "cancel" -d 'Stop a file in or out and delete it from the relays'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from files" -f -a "retry" -d 'Go on with an upload or download that stopped'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relays" -f -a "list" -d 'List your relays (the default)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relays" -f -a "add" -d 'Add a relay for new connections (after checking that it answers as the key in its address)'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relays" -f -a "remove" -d 'Stop using a relay for new connections; connections that receive through it move to your other relays'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relays" -f -a "test" -d 'Check that each relay answers and holds the key its address names'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from key" -f -a "export" -d 'Write the unlocked identity to a file (mode 0600) for scripts and cron jobs: with --identity FILE, commands skip the slow passphrase step'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from key" -f -a "passwd" -d 'Change the passphrase (or remove it with --no-passphrase); with --rekey, also move the whole profile to a new key'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "link" -d 'Show a one-time device link (QR code or text) for a new device'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "confirm" -d 'Link the device that answered a device link shown without --wait'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "revoke" -d 'Withdraw a device link nobody should use any more'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "join" -d 'On the new device: join a profile with a device link'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "list" -d 'List this profile\'s devices'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from device" -f -a "remove" -d 'Cut a device off: it receives nothing new, even if lost or hostile'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relay" -f -a "serve" -d 'Serve until SIGTERM or SIGINT; prints the relay\'s address on the first line of stdout'
complete -c tern -n "__fish_tern_using_subcommand help; and __fish_seen_subcommand_from relay" -f -a "address" -d 'Print the address of the relay in --data (or in the --store database)'
