# CASE: iptables-legacy hardening "no outgoing connections": OUTPUT drops TCP SYNs (--syn); an incoming connection's SYN-ACK has SYN|ACK and leaves, so listeners stay reachable
# PROBE: tcp:22 udp:53
set -e
iptables-legacy-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --syn -j DROP
COMMIT
R
ip6tables-legacy-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --tcp-flags SYN,ACK SYN -j DROP
COMMIT
R
