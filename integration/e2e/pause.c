/* The test's own pod sandbox ("pause") image: PID 1 of a pod that waits for a signal and exits.
 * Static, so that it runs from a single-file image. Built by build-images.py. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void bye(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGTERM, bye);
  signal(SIGINT, bye);
  for (;;)
    pause();
}
