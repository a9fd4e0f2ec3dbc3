/* The WAN benchmark's one-way delay line in C: delayline.py's daemon, with the
 * same netlink conversation, for half its CPU: no interpreter runs per packet,
 * and what is left is the kernel's (docs/performance.md, "The delay line's own
 * CPU").
 *
 * Every packet the namespace's iptables rule sends to NFQUEUE QUEUE is
 * accepted DELAY seconds after this process read it. Only the metadata crosses
 * into user space (copy mode META, GSO packets whole); every packet of the
 * queue waits the same time, so they leave in the order they came, and one
 * batch verdict ("accept every id up to N") releases all that are due. A
 * wake-up costs one ppoll, one recvmmsg per BATCH packets waiting and at most
 * one verdict.
 *
 * Usage (as root, in the namespace): delayline QUEUE DELAY_SECONDS
 * It prints one line once the queue is bound, exits 0 on SIGTERM, and on an
 * error prints one line naming it and exits 1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* Packets the kernel may hold for us (delayline.py's QUEUE_MAXLEN); our ring
 * of due times has room for as many, so it cannot overflow. */
#define QUEUE_MAXLEN 200000
/* Datagrams per recvmmsg: one queued packet each, a few hundred bytes. */
#define BATCH 64
#define MESSAGE_ROOM 2048

struct held {
	uint64_t due_ns;
	uint32_t id;
};

static struct held ring[QUEUE_MAXLEN];
static unsigned head, count;
static int fd;
static uint16_t queue;
static uint32_t seq;
static volatile sig_atomic_t stopping;

static void fail(const char *what)
{
	fprintf(stderr, "delay line: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* An nfnetlink queue message of TYPE with up to two attributes. */
struct request {
	struct nlmsghdr nh;
	struct nfgenmsg nf;
	char attrs[64];
};

static void put_attr(struct request *r, uint16_t type, const void *data, uint16_t len)
{
	struct nlattr *a = (struct nlattr *)((char *)r + r->nh.nlmsg_len);
	a->nla_type = type;
	a->nla_len = NLA_HDRLEN + len;
	memcpy((char *)a + NLA_HDRLEN, data, len);
	r->nh.nlmsg_len += NLA_ALIGN(a->nla_len);
}

static void start_request(struct request *r, uint16_t type, uint16_t flags)
{
	memset(r, 0, sizeof(*r));
	r->nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg));
	r->nh.nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | type;
	r->nh.nlmsg_flags = NLM_F_REQUEST | flags;
	r->nh.nlmsg_seq = ++seq;
	r->nf.nfgen_family = AF_UNSPEC;
	r->nf.version = NFNETLINK_V0;
	r->nf.res_id = htons(queue);
}

/* Send a config request and wait for the kernel's acknowledgement. */
static void config(struct request *r, const char *what)
{
	char reply[4096];
	if (send(fd, r, r->nh.nlmsg_len, 0) < 0)
		fail(what);
	ssize_t n = recv(fd, reply, sizeof(reply), 0);
	if (n < 0)
		fail(what);
	struct nlmsghdr *nh = (struct nlmsghdr *)reply;
	if (n >= (ssize_t)NLMSG_LENGTH(sizeof(int)) && nh->nlmsg_type == NLMSG_ERROR) {
		errno = -((struct nlmsgerr *)NLMSG_DATA(nh))->error;
		if (errno)
			fail(what);
	}
}

static void bind_queue(void)
{
	struct request r;
	fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
	if (fd < 0)
		fail("netlink socket");
	int big = 64 * 1024 * 1024, one = 1;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0 ||
	    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one)) < 0)
		fail("netlink socket options");
	struct sockaddr_nl local = {.nl_family = AF_NETLINK};
	if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0)
		fail("netlink bind");

	struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND};
	start_request(&r, NFQNL_MSG_CONFIG, NLM_F_ACK);
	put_attr(&r, NFQA_CFG_CMD, &cmd, sizeof(cmd));
	config(&r, "NFQUEUE bind");

	struct nfqnl_msg_config_params params = {.copy_range = 0, .copy_mode = NFQNL_COPY_META};
	start_request(&r, NFQNL_MSG_CONFIG, NLM_F_ACK);
	put_attr(&r, NFQA_CFG_PARAMS, &params, sizeof(params));
	config(&r, "NFQUEUE copy mode");

	uint32_t maxlen = htonl(QUEUE_MAXLEN);
	start_request(&r, NFQNL_MSG_CONFIG, NLM_F_ACK);
	put_attr(&r, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof(maxlen));
	config(&r, "NFQUEUE length");

	uint32_t gso = htonl(NFQA_CFG_F_GSO);
	start_request(&r, NFQNL_MSG_CONFIG, NLM_F_ACK);
	put_attr(&r, NFQA_CFG_FLAGS, &gso, sizeof(gso));
	put_attr(&r, NFQA_CFG_MASK, &gso, sizeof(gso));
	config(&r, "NFQUEUE GSO flag");
}

/* Hold the packet ids of one datagram until DUE. */
static void hold(const char *buf, int len, uint64_t due)
{
	const struct nlmsghdr *nh = (const struct nlmsghdr *)buf;
	for (; NLMSG_OK(nh, len); nh = NLMSG_NEXT(nh, len)) {
		if (nh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET))
			continue;
		const char *at = (const char *)NLMSG_DATA(nh) + NLMSG_ALIGN(sizeof(struct nfgenmsg));
		const char *end = (const char *)nh + nh->nlmsg_len;
		while (at + NLA_HDRLEN <= end) {
			const struct nlattr *a = (const struct nlattr *)at;
			if (a->nla_len < NLA_HDRLEN || at + a->nla_len > end)
				break;
			if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR) {
				const struct nfqnl_msg_packet_hdr *ph = (const void *)(at + NLA_HDRLEN);
				if (count == QUEUE_MAXLEN) {
					errno = ENOBUFS;
					fail("more packets held than the queue's length");
				}
				ring[(head + count++) % QUEUE_MAXLEN] = (struct held){due, ntohl(ph->packet_id)};
				break;
			}
			at += NLA_ALIGN(a->nla_len);
		}
	}
}

/* Read every datagram waiting, BATCH per syscall, each due DELAY from now. */
static void read_all(uint64_t due)
{
	static char bufs[BATCH][MESSAGE_ROOM];
	static struct iovec iov[BATCH];
	static struct mmsghdr msgs[BATCH];
	int n;
	do {
		for (int i = 0; i < BATCH; i++) {
			iov[i] = (struct iovec){bufs[i], MESSAGE_ROOM};
			msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &iov[i], .msg_iovlen = 1}};
		}
		n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			fail("netlink receive");
		}
		for (int i = 0; i < n; i++) {
			if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) {
				errno = EMSGSIZE;
				fail("netlink message larger than its buffer");
			}
			hold(bufs[i], (int)msgs[i].msg_len, due);
		}
	} while (n == BATCH);
}

/* ACCEPT every held packet that is due by NOW, with one batch verdict. */
static void release_due(uint64_t now)
{
	uint32_t last = 0;
	int any = 0;
	while (count > 0 && ring[head].due_ns <= now) {
		last = ring[head].id;
		head = (head + 1) % QUEUE_MAXLEN;
		count--;
		any = 1;
	}
	if (!any)
		return;
	struct nfqnl_msg_verdict_hdr verdict = {htonl(NF_ACCEPT), htonl(last)};
	struct request r;
	start_request(&r, NFQNL_MSG_VERDICT_BATCH, 0);
	put_attr(&r, NFQA_VERDICT_HDR, &verdict, sizeof(verdict));
	if (send(fd, &r, r.nh.nlmsg_len, 0) < 0)
		fail("netlink verdict");
}

static void on_sigterm(int sig)
{
	(void)sig;
	stopping = 1;
}

int main(int argc, char **argv)
{
	char *rest;
	double delay = argc == 3 ? strtod(argv[2], &rest) : -1;
	if (argc != 3 || *rest || delay < 0 || delay > 60) {
		fprintf(stderr, "usage: %s QUEUE DELAY_SECONDS (0-60)\n", argv[0]);
		return 2;
	}
	queue = (uint16_t)atoi(argv[1]);
	uint64_t delay_ns = (uint64_t)(delay * 1e9 + 0.5);

	/* SIGTERM is blocked except inside ppoll: it cannot slip in between the
	 * check of `stopping` and the wait. */
	sigset_t term, unblocked;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, &unblocked);
	sigdelset(&unblocked, SIGTERM);
	struct sigaction sa = {.sa_handler = on_sigterm};
	sigaction(SIGTERM, &sa, NULL);

	/* A late wake-up is added delay: ask for the CPU first (as root). */
	struct sched_param prio = {.sched_priority = 10};
	sched_setscheduler(0, SCHED_FIFO, &prio);

	bind_queue();
	printf("delay line: queue %u, %g ms (C)\n", queue, delay * 1000);
	fflush(stdout);

	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	while (!stopping) {
		struct timespec wait, *timeout = NULL;
		if (count > 0) {
			uint64_t now = now_ns();
			uint64_t due = ring[head].due_ns;
			uint64_t left = due > now ? due - now : 0;
			wait = (struct timespec){left / 1000000000u, left % 1000000000u};
			timeout = &wait;
		}
		int ready = ppoll(&pfd, 1, timeout, &unblocked);
		if (ready < 0 && errno != EINTR)
			fail("ppoll");
		uint64_t now = now_ns();
		if (ready > 0)
			read_all(now + delay_ns);
		release_due(now);
	}
	return 0;
}
