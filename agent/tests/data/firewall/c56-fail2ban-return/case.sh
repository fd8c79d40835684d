# CASE: fail2ban's iptables-multiport action (no current bans) in front of the admin's rule: INPUT jumps tcp/22 to f2b-sshd (only RETURN), then drops SSH from outside c1's network: only c1 reaches 22 (both families)
# PROBE: tcp:22 tcp:80
set -e
iptables-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -p tcp -m tcp --dport 22 ! -s 198.51.100.0/24 -j DROP
-A f2b-sshd -j RETURN
COMMIT
R
ip6tables-restore <<'R'
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:f2b-sshd - [0:0]
-A INPUT -p tcp -m multiport --dports 22 -j f2b-sshd
-A INPUT -p tcp -m tcp --dport 22 ! -s 2001:db8:100::/64 -j DROP
-A f2b-sshd -j RETURN
COMMIT
R
