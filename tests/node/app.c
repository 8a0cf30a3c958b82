/* The naive app of the node tier (tests/node.rs): HTTP/1.1 on the port given as argv[1],
 * answers every request `200 ok` (keep-alive), and exits at once on SIGTERM, as an app
 * with no graceful-shutdown code does. One process per connection; as PID 1 of its
 * container it installs a SIGTERM handler (PID 1 ignores default-action signals), and its
 * connection processes die with it when the container's PID namespace goes.
 * Built static (gcc -Os -static) by the harness. */
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void serve(int fd) {
  static const char ok[] =
      "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";
  char buf[8192];
  size_t have = 0;
  for (;;) {
    ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
    if (n <= 0) return;
    have += (size_t)n;
    buf[have] = 0;
    char *end;
    /* GET/HEAD only: a request ends at its blank line. */
    while ((end = strstr(buf, "\r\n\r\n")) != NULL) {
      int close_after = strstr(buf, "onnection: close") != NULL &&
                        strstr(buf, "onnection: close") < end;
      if (write(fd, ok, sizeof ok - 1) < 0) return;
      if (close_after) return;
      size_t used = (size_t)(end + 4 - buf);
      memmove(buf, end + 4, have - used + 1);
      have -= used;
    }
    if (have >= sizeof buf - 1) return;
  }
}

int main(int argc, char **argv) {
  int port = argc > 1 ? atoi(argv[1]) : 8080;
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)port);
  if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 128) != 0) {
    perror("app: bind/listen");
    return 1;
  }
  fprintf(stderr, "app: listening on :%d\n", port);
  for (;;) {
    int c = accept(s, NULL, NULL);
    if (c < 0) continue;
    pid_t pid = fork();
    if (pid == 0) {
      close(s);
      signal(SIGTERM, SIG_DFL);
      serve(c);
      _exit(0);
    }
    close(c);
  }
}
