/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * libmptcpize.so: an LD_PRELOAD shim that turns an unmodified program's TCP
 * sockets into Multipath TCP sockets.
 *
 * socket(AF_INET or AF_INET6, SOCK_STREAM[|flags], 0 or IPPROTO_TCP) is
 * created as IPPROTO_MPTCP instead. When the kernel refuses MPTCP (no
 * CONFIG_MPTCP: EPROTONOSUPPORT; net.mptcp.enabled=0: ENOPROTOOPT; a
 * seccomp or LSM policy: EPERM/EACCES) the plain TCP socket is created, so
 * the program behaves exactly as it would without the shim. Every other
 * socket passes through untouched.
 *
 * It intercepts the public socket() only: glibc's own internal calls and
 * programs that make raw system calls (Go, static binaries) are not
 * affected; Go programs take GODEBUG=multipathtcp=1 instead (`mptcpd-py
 * mptcpize run` sets both).
 *
 * Build: cc -O2 -fPIC -shared -o libmptcpize.so mptcpize.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif

/* SOCK_NONBLOCK and SOCK_CLOEXEC ride in the type argument's high bits. */
#define SOCK_TYPE_MASK 0xf

typedef int (*socket_fn)(int, int, int);

static socket_fn real_socket_fn;

static socket_fn real_socket(void)
{
	/* Benign race: every thread resolves the same pointer. */
	socket_fn fn = __atomic_load_n(&real_socket_fn, __ATOMIC_ACQUIRE);

	if (!fn) {
		fn = (socket_fn)dlsym(RTLD_NEXT, "socket");
		__atomic_store_n(&real_socket_fn, fn, __ATOMIC_RELEASE);
	}
	return fn;
}

static int wants_mptcp(int domain, int type, int protocol)
{
	return (domain == AF_INET || domain == AF_INET6) &&
	       (type & SOCK_TYPE_MASK) == SOCK_STREAM &&
	       (protocol == 0 || protocol == IPPROTO_TCP);
}

__attribute__((visibility("default")))
int socket(int domain, int type, int protocol)
{
	socket_fn fn = real_socket();
	int fd;

	if (!fn) {
		errno = ENOSYS;
		return -1;
	}
	if (wants_mptcp(domain, type, protocol)) {
		int saved_errno = errno;

		fd = fn(domain, type, IPPROTO_MPTCP);
		if (fd >= 0)
			return fd;
		/* Refused: the TCP socket the program asked for, and its errno. */
		errno = saved_errno;
	}
	return fn(domain, type, protocol);
}
