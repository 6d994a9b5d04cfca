# Network off: the sandbox has its own empty network namespace (loopback only), so neither the
# node's port on the host's 127.0.0.1 nor the stand-in outside host is reachable, directly or
# through a proxy address. Variables: ESCAPE_NODE_ADDRESS (host:port), ESCAPE_OUTSIDE_ADDRESS.
reach() { perl -MIO::Socket::INET -e 'exit(IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3) ? 0 : 1)' "$1"; }
got=""
reach "$ESCAPE_NODE_ADDRESS" && got="$got node:$ESCAPE_NODE_ADDRESS"
reach "$ESCAPE_OUTSIDE_ADDRESS" && got="$got outside:$ESCAPE_OUTSIDE_ADDRESS"
reach "127.0.0.1:3128" && got="$got proxy-port"
if [ -n "$got" ]; then echo "RESULT escaped: reached$got"; exit 0; fi
echo "RESULT blocked: no route to the node ($ESCAPE_NODE_ADDRESS), the outside ($ESCAPE_OUTSIDE_ADDRESS) or a proxy"
