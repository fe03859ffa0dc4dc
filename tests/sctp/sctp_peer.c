/*
 * sctp-peer: a real SCTP endpoint for the tests, on usrsctp (the FreeBSD
 * SCTP stack in userspace, over raw IP sockets: this machine's kernel has
 * no SCTP, CONFIG_IP_SCTP unset). Built by the tests (tests/src/sctp.rs).
 *
 *   sctp-peer server ADDR PORT NAME
 *       Listens on ADDR:PORT (one-to-one style); for each association,
 *       reads one message M and answers "NAME PEER M" (PEER: the address
 *       and port the association came from, [v6]:port for IPv6), then
 *       closes. Prints "listening" once ready.
 *   sctp-peer client SRC DST PORT COUNT
 *       COUNT associations from SRC (or "-": any) to DST:PORT, one after
 *       the other: connect, send "req-I", print "OK <answer>" or
 *       "FAIL <step> <error>". Exits 1 if any failed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <usrsctp.h>

static int parse(const char *a, int port, struct sockaddr_storage *ss, socklen_t *len)
{
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	if (inet_pton(AF_INET, a, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		*len = sizeof(*s4);
		return AF_INET;
	}
	if (inet_pton(AF_INET6, a, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		*len = sizeof(*s6);
		return AF_INET6;
	}
	return -1;
}

static void format_peer(const struct sockaddr *sa, char *out, size_t n)
{
	char b[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *s = (const void *)sa;
		inet_ntop(AF_INET, &s->sin_addr, b, sizeof(b));
		snprintf(out, n, "%s:%u", b, ntohs(s->sin_port));
	} else {
		const struct sockaddr_in6 *s = (const void *)sa;
		inet_ntop(AF_INET6, &s->sin6_addr, b, sizeof(b));
		snprintf(out, n, "[%s]:%u", b, ntohs(s->sin6_port));
	}
}

static ssize_t recv_msg(struct socket *s, char *buf, size_t n)
{
	struct sockaddr_storage from;
	socklen_t from_len = sizeof(from), info_len = 0;
	unsigned int info_type = 0;
	int flags = 0;
	ssize_t r = usrsctp_recvv(s, buf, n - 1, (struct sockaddr *)&from, &from_len, NULL, &info_len, &info_type, &flags);

	if (r >= 0)
		buf[r] = 0;
	return r;
}

static int server(const char *addr, int port, const char *name)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = parse(addr, port, &ss, &len);
	struct socket *l;

	if (fam < 0) {
		fprintf(stderr, "bad address %s\n", addr);
		return 2;
	}
	l = usrsctp_socket(fam, SOCK_STREAM, IPPROTO_SCTP, NULL, NULL, 0, NULL);
	if (!l || usrsctp_bind(l, (struct sockaddr *)&ss, len) < 0 || usrsctp_listen(l, 64) < 0) {
		perror("listen");
		return 1;
	}
	printf("listening\n");
	fflush(stdout);
	for (;;) {
		struct sockaddr_storage from;
		socklen_t from_len = sizeof(from);
		char buf[1024], peer[80], out[1200];
		struct socket *c = usrsctp_accept(l, (struct sockaddr *)&from, &from_len);

		if (!c)
			continue;
		format_peer((struct sockaddr *)&from, peer, sizeof(peer));
		if (recv_msg(c, buf, sizeof(buf)) > 0) {
			int m = snprintf(out, sizeof(out), "%s %s %s", name, peer, buf);
			usrsctp_sendv(c, out, m, NULL, 0, NULL, 0, SCTP_SENDV_NOINFO, 0);
		}
		usrsctp_close(c);
	}
}

static int client(const char *src, const char *dst, int port, int count)
{
	int fails = 0;

	for (int i = 0; i < count; i++) {
		struct sockaddr_storage to, from;
		socklen_t to_len, from_len;
		int fam = parse(dst, port, &to, &to_len);
		struct socket *s;
		char msg[64], buf[1300];
		int m;

		if (fam < 0) {
			fprintf(stderr, "bad address %s\n", dst);
			return 2;
		}
		s = usrsctp_socket(fam, SOCK_STREAM, IPPROTO_SCTP, NULL, NULL, 0, NULL);
		if (!s) {
			printf("FAIL socket %s\n", strerror(errno));
			return 1;
		}
		if (strcmp(src, "-") && parse(src, 0, &from, &from_len) > 0 && usrsctp_bind(s, (struct sockaddr *)&from, from_len) < 0) {
			printf("FAIL bind %s\n", strerror(errno));
			return 1;
		}
		if (usrsctp_connect(s, (struct sockaddr *)&to, to_len) < 0) {
			printf("FAIL connect %s\n", strerror(errno));
			fails++;
		} else {
			m = snprintf(msg, sizeof(msg), "req-%d", i);
			if (usrsctp_sendv(s, msg, m, NULL, 0, NULL, 0, SCTP_SENDV_NOINFO, 0) < 0) {
				printf("FAIL send %s\n", strerror(errno));
				fails++;
			} else if (recv_msg(s, buf, sizeof(buf)) <= 0) {
				printf("FAIL recv %s\n", strerror(errno));
				fails++;
			} else {
				printf("OK %s\n", buf);
			}
		}
		fflush(stdout);
		usrsctp_close(s);
	}
	return fails ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "server")) {
		usrsctp_init(0, NULL, NULL);
		/* No ABORT for packets of no association: another endpoint's. */
		usrsctp_sysctl_set_sctp_blackhole(2);
		return server(argv[2], atoi(argv[3]), argv[4]);
	}
	if (argc == 6 && !strcmp(argv[1], "client")) {
		int rc;

		usrsctp_init(0, NULL, NULL);
		usrsctp_sysctl_set_sctp_blackhole(2);
		rc = client(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
		/* Skip usrsctp_finish: associations closing in the background
		 * would only delay the exit. */
		return rc;
	}
	fprintf(stderr, "usage: sctp-peer server ADDR PORT NAME | client SRC DST PORT COUNT\n");
	return 2;
}
