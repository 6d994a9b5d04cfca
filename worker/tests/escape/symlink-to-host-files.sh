# Symbolic links to host files, committed: only the link target strings may leave (the worker's
# host-side git never follows them). The verdict is the test's, from what reached the origin.
ln -s /etc/shadow shadow-link && ln -s /root root-link && echo "RESULT submitted: links to /etc/shadow and /root"
