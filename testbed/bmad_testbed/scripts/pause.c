/* The pod sandbox of the test bed's real node: holds the pod's namespaces open,
 * reaps the zombies it inherits, and exits on SIGINT or SIGTERM. Built static, so
 * its image is this one file. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction quit = {.sa_handler = stop};
  struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
  sigemptyset(&quit.sa_mask);
  sigemptyset(&child.sa_mask);
  if (sigaction(SIGINT, &quit, NULL) < 0 || sigaction(SIGTERM, &quit, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0) {
    perror("sigaction");
    return 1;
  }
  if (getpid() != 1) {
    fprintf(stderr, "pause: warning: not running as pid 1\n");
  }
  for (;;) {
    pause();
  }
}
