/* The few kernel definitions the program uses, written out here instead of
 * included from the kernel tree. <linux/ip.h> and <linux/ipv6.h> pull in
 * skbuff.h and with it most of the kernel's internal headers, and
 * <linux/jiffies.h> much of the rest: clang parsed some 1.7 s of headers at
 * every compile (BCC parses the source twice) for three packet headers, two
 * protocol numbers and two clock constants. The structs are the uapi ones
 * (<uapi/linux/if_ether.h>, ip.h, ipv6.h, in6.h), little-endian bit-fields
 * as on every host BCC compiles for; the program compiles to the same
 * instructions as with the kernel's headers.
 *
 * HZ is the running kernel's tick rate as its build configuration says
 * (CONFIG_HZ, from the autoconf.h BCC includes), as <linux/jiffies.h> has
 * it; INITIAL_JIFFIES is that header's definition. */
#ifndef TIDEGATE_KERNEL_DEFS_H
#define TIDEGATE_KERNEL_DEFS_H

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the bit-fields of iphdr and ipv6hdr below are laid out for a little-endian build"
#endif
#ifndef CONFIG_HZ
#error "CONFIG_HZ is not defined: BCC includes the kernel's autoconf.h, which defines it"
#endif
#ifndef HZ
#define HZ CONFIG_HZ
#endif
#ifndef INITIAL_JIFFIES
#define INITIAL_JIFFIES ((unsigned long)(unsigned int)(-300 * HZ))
#endif

#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

struct ethhdr {
	unsigned char h_dest[6];
	unsigned char h_source[6];
	__be16 h_proto;
} __attribute__((packed));

struct iphdr {
	__u8 ihl:4,
	     version:4;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be16 u6_addr16[8];
		__be32 u6_addr32[4];
	} in6_u;
};

struct ipv6hdr {
	__u8 priority:4,
	     version:4;
	__u8 flow_lbl[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	struct in6_addr saddr;
	struct in6_addr daddr;
};

#endif
