package jstest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
)

// The Cluster's servers are configured as deploy/nats configures
// production in everything that decides what survives a killed server:
// JetStream on file storage with an fsync before every acknowledgement,
// the payload size of meterd's batches, one named cluster routed to each
// of three servers. Both files are parsed by nats-server itself.
func TestClusterConfigMatchesDeploy(t *testing.T) {
	t.Setenv("SERVER_NAME", "nats-0")
	t.Setenv("NATS_PASSWORD", "secret")
	deploy, err := server.ProcessConfigFile(filepath.Join("..", "..", "deploy", "nats", "nats.conf"))
	if err != nil {
		t.Fatal(err)
	}
	routes := []string{"nats://127.0.0.1:1", "nats://127.0.0.1:2", "nats://127.0.0.1:3"}
	nd := &clusterNode{name: "n0", dir: t.TempDir(), port: 4, route: 1, httpP: 5}
	file := filepath.Join(t.TempDir(), "n0.conf")
	if err := os.WriteFile(file, []byte(nd.config(routes)), 0o644); err != nil {
		t.Fatal(err)
	}
	test, err := server.ProcessConfigFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []*server.Options{deploy, test} {
		if !o.JetStream || !o.SyncAlways || o.MaxPayload != deploy.MaxPayload || o.Cluster.Name != deploy.Cluster.Name ||
			o.Cluster.NoAdvertise != deploy.Cluster.NoAdvertise || len(o.Routes) != 3 {
			t.Errorf("%s: jetstream %v, sync always %v, max_payload %d, cluster %q (no_advertise %v) with %d routes; "+
				"want JetStream syncing always, max_payload %d, cluster %q (no_advertise %v) with 3 routes, as deploy/nats",
				o.ConfigFile, o.JetStream, o.SyncAlways, o.MaxPayload, o.Cluster.Name, o.Cluster.NoAdvertise, len(o.Routes),
				deploy.MaxPayload, deploy.Cluster.Name, deploy.Cluster.NoAdvertise)
		}
	}
	if test.ServerName != "n0" || test.Port != 4 || test.HTTPPort != 5 || test.Cluster.Port != 1 || test.StoreDir != nd.dir {
		t.Errorf("server %q on %d (http %d, routes %d) storing in %s; want n0 on 4 (5, 1) in %s",
			test.ServerName, test.Port, test.HTTPPort, test.Cluster.Port, test.StoreDir, nd.dir)
	}
}

// A Cluster's server SIGKILLed and started again: an R3 stream elects
// another leader and takes publishes while it is dead, and the server
// comes back holding every message.
func TestClusterKillAndStart(t *testing.T) {
	if testing.Short() {
		t.Skip("three nats-server processes")
	}
	c := StartCluster(t, 3)
	js := c.JetStream()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "T", Subjects: []string{"t"}, Storage: jetstream.FileStorage, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	publish := func(n int) {
		for i := range n {
			// The first publishes after a kill wait for the election.
			for try := 0; ; try++ {
				pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				_, err := js.Publish(pctx, "t", []byte("m"), jetstream.WithMsgID(fmt.Sprintf("m%d-%d", n, i)))
				cancel()
				if err == nil {
					break
				}
				if try == 20 {
					t.Fatalf("publish: %v", err)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	publish(50)
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	victim := c.Index(info.Cluster.Leader)
	if victim < 0 {
		t.Fatalf("leader %q is not a server of the cluster", info.Cluster.Leader)
	}
	t0 := time.Now()
	c.Kill(victim)
	publish(60)
	t.Logf("60 published %s after the kill", time.Since(t0))
	c.Start(victim, time.Minute)
	t.Logf("back %s after the kill", time.Since(t0))
	info, err = s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 110 || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("after %s was killed and started: %d messages, cluster %+v; want 110, a leader and 2 replicas",
			c.Name(victim), info.State.Msgs, info.Cluster)
	}
	for _, r := range info.Cluster.Replicas {
		if !r.Current || r.Offline {
			t.Errorf("replica %+v not current after the restart", r)
		}
	}
}
