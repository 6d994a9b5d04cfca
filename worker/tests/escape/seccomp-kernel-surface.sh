# bpf(321), io_uring_setup(425), keyctl(250), perf_event_open(298), userfaultfd(323),
# socket(AF_NETLINK=16), socket(AF_PACKET=17), socket(AF_INET, SOCK_RAW=3), setns(308).
out=$(perl -e '
  my %calls = ("bpf" => [321, 0, 0, 0], "io_uring_setup" => [425, 1, 0], "keyctl" => [250, 0, 0, 0],
    "perf_event_open" => [298, 0, 0, -1, -1, 0], "userfaultfd" => [323, 0],
    "socket_netlink" => [41, 16, 3, 0], "socket_packet" => [41, 17, 3, 0], "socket_raw" => [41, 2, 3, 1],
    "setns" => [308, 0, 0]);
  my @bad;
  for my $name (sort keys %calls) { my @a = @{$calls{$name}}; my $n = shift @a; my $r = syscall($n, @a); my $e = $! + 0;
    if ($r >= 0 || $e != 1) { push @bad, "$name=$r/errno$e" } }
  print @bad ? "escaped: @bad" : "blocked";')
case "$out" in blocked) echo "RESULT blocked: bpf, io_uring_setup, keyctl, perf_event_open, userfaultfd, setns, AF_NETLINK, AF_PACKET, SOCK_RAW all EPERM";; *) echo "RESULT $out";; esac
