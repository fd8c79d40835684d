# CASE: hardening "no outgoing connections": OUTPUT drops TCP packets with only SYN set (iptables-nft, --tcp-flags for IPv4, --syn for IPv6); an incoming connection's SYN-ACK has SYN|ACK and leaves
# PROBE: tcp:22 udp:53
set -e
iptables-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j DROP
COMMIT
R
ip6tables-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --syn -j DROP
COMMIT
R
