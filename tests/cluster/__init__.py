"""Real clusters on one machine, for the tests of issue 26 (root only; otherwise they skip
saying what is missing): two hosts in network and mount namespaces joined by a veth pair, with
an sshd each (hosts.py), and a one-node Slurm cluster with munge (slurm.py)."""
