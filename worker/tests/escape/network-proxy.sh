# Network on: the only way out is the attempt's CONNECT proxy. The allowed host must work (the
# control: otherwise every refusal below would prove nothing); a host outside the allowlist,
# the node's own port and direct connections must not. Variables: ESCAPE_NODE_ADDRESS
# (host:port), ESCAPE_OUTSIDE_ADDRESS (address:port), ESCAPE_OUTSIDE_PORT.
reach() { perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3) ? 0 : 1)' "$1"; }
proxied() { curl -sS --max-time 5 --proxytunnel "$1" 2>&1; }
control=$(proxied "http://outside.test:$ESCAPE_OUTSIDE_PORT/")
case "$control" in *"hello from outside"*) ;; *) echo "RESULT error: the allowed host is unreachable: $control"; exit 1;; esac
got=""
reach "$ESCAPE_NODE_ADDRESS" && got="$got direct-node"
reach "$ESCAPE_OUTSIDE_ADDRESS" && got="$got direct-outside"
case "$(proxied "http://denied.test:$ESCAPE_OUTSIDE_PORT/")" in *"hello from outside"*) got="$got proxied-denied-host";; esac
proxied "http://$ESCAPE_NODE_ADDRESS/" >/dev/null && got="$got proxied-node"
if [ -n "$got" ]; then echo "RESULT escaped: reached$got"; exit 0; fi
echo "RESULT blocked: outside.test allowed through the proxy; denied.test, the node's port and direct connections refused"
