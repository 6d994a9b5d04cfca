# Permission checks only: never write a byte into sysrq-trigger.
if test -w /proc/sysrq-trigger; then echo "RESULT escaped: /proc/sysrq-trigger is writable (test -w)"; exit 0; fi
if { true > /proc/sysrq-trigger; } 2>/dev/null; then echo "RESULT escaped: /proc/sysrq-trigger opened for writing"; exit 0; fi
if test -w /proc/sys/kernel/hostname || { true > /proc/sys/kernel/hostname; } 2>/dev/null; then echo "RESULT escaped: /proc/sys is writable"; exit 0; fi
err=$( { true > /proc/sysrq-trigger; } 2>&1)
echo "RESULT blocked: $err; /proc/sys not writable either"
