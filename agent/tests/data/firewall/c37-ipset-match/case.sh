# CASE: fail2ban-style ban lists (iptables-nft + ipset, permanent bans): f2b-sshd holds c2's IPv4 address, f2b-sshd6 c1's IPv6 address; tcp/22 from a member is rejected with port-unreachable. The rules only say `-m set --match-set`: who is banned lives in the kernel's ipsets. (c1-v6 shows TIMEOUT, not REFUSED: in this veth lab an ICMPv6 error to the first SYN is taken as a soft error, as in c05 and c20)
# PROBE: tcp:22 tcp:80
set -e
ipset create f2b-sshd hash:ip
ipset add f2b-sshd 203.0.113.200
ipset create f2b-sshd6 hash:ip family inet6
ipset add f2b-sshd6 2001:db8:100::100
iptables -I INPUT -p tcp -m multiport --dports 22 -m set --match-set f2b-sshd src -j REJECT --reject-with icmp-port-unreachable
ip6tables -I INPUT -p tcp -m multiport --dports 22 -m set --match-set f2b-sshd6 src -j REJECT --reject-with icmp6-port-unreachable
