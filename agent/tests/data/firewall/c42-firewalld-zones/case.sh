# CASE: real firewalld 1.3 (nftables backend), zones bound to interfaces and sources: default zone public (ssh, dhcpv6-client) on eth0; internal (ssh, mdns, samba-client, dhcpv6-client) + 5432/tcp on eth1; source 198.51.100.0/24 in work + http; source 2001:db8:100::/64 in dmz + 8080/tcp
# PROBE: tcp:22 tcp:80 tcp:5432 tcp:8080 udp:546 udp:5353
RUN=${FWLAB_RUN:-${TMPDIR:-/tmp}/fwlab}; mkdir -p $RUN; rm -f $RUN/firewalld.ready
export RUN; setsid unshare -m bash -c '
  mount -t tmpfs tmpfs /run/dbus && dbus-daemon --system --fork --nopidfile
  firewalld --nofork --nopid & echo $! > $RUN/firewalld.pid
  for i in $(seq 60); do firewall-cmd --state >/dev/null 2>&1 && break; sleep 0.5; done
  firewall-cmd --state
  firewall-cmd --zone=public --change-interface=eth0
  firewall-cmd --zone=internal --change-interface=eth1
  firewall-cmd --zone=internal --add-port=5432/tcp
  firewall-cmd --zone=work --add-source=198.51.100.0/24
  firewall-cmd --zone=work --add-service=http
  firewall-cmd --zone=dmz --add-source=2001:db8:100::/64
  firewall-cmd --zone=dmz --add-port=8080/tcp
  firewall-cmd --get-active-zones
  firewall-cmd --list-all-zones
  touch $RUN/firewalld.ready
  wait' > $RUN/firewalld.log 2>&1 < /dev/null &
for i in $(seq 80); do [ -e $RUN/firewalld.ready ] && break; sleep 0.5; done
cat $RUN/firewalld.log
[ -e $RUN/firewalld.ready ]
