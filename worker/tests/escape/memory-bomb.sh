perl -e 'my @hog; while (1) { push @hog, "x" x (16 * 1024 * 1024); }'
status=$?
if [ "$status" -eq 137 ]; then echo "RESULT blocked: the hog was SIGKILLed by the OOM killer at the memory limit"; else echo "RESULT escaped: the memory hog ended with status $status"; fi
