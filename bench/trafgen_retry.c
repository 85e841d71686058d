/* LD_PRELOAD shim for trafgen (netsniff-ng 0.6.8) in bench/veth_flood.py.
 *
 * trafgen sends from a PACKET_TX_RING and aborts ("Flushing TX_RING failed")
 * as soon as a flush returns EAGAIN or ENOBUFS, which happens on veth once
 * the receiving CPU falls behind: the skbs queued there still hold the
 * socket's send-buffer memory. This shim turns that into backpressure:
 *   - every AF_PACKET socket gets a 16 MiB send buffer (SO_SNDBUFFORCE);
 *   - sendto() failing with EAGAIN/ENOBUFS is retried after a short sleep,
 *     for at most 2 s per call, then the error is passed on as before.
 * Nothing else in trafgen changes. Built by veth_flood.py into a temporary
 * directory: gcc -shared -fPIC -O2 -o trafgen_retry.so trafgen_retry.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
#include <time.h>

int socket(int domain, int type, int protocol)
{
	static int (*real)(int, int, int);
	if (!real)
		real = dlsym(RTLD_NEXT, "socket");
	int fd = real(domain, type, protocol);
	if (fd >= 0 && domain == AF_PACKET) {
		int size = 16 << 20;
		setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size));
	}
	return fd;
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t alen)
{
	static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
	if (!real)
		real = dlsym(RTLD_NEXT, "sendto");
	struct timespec pause = { 0, 20000 }; /* 20 us */
	for (int i = 0; i < 100000; i++) {     /* 100000 x 20 us = 2 s at most */
		ssize_t r = real(fd, buf, len, flags, addr, alen);
		if (r >= 0 || (errno != EAGAIN && errno != ENOBUFS))
			return r;
		nanosleep(&pause, NULL);
	}
	return real(fd, buf, len, flags, addr, alen);
}
