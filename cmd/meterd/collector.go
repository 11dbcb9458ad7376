package main

import (
	"context"
	"io"
)

// runCollector runs the collector against an external NATS.
func runCollector(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs, s, err := newFlags("collector", args, stderr, ":8080")
	if err != nil {
		return err
	}
	f := s.file
	natsFlags(fs, &f.NATS)
	refuseDuplicateWindow(fs, "collector")
	collectorFlags(fs, &f.Collector, "./meterd-spool")
	keysFlag(fs, s)
	fs.BoolVar(&s.insecure, "insecure", false, "run without API keys (every request acts as admin)")
	if err := parse(fs, args); err != nil {
		return err
	}
	log, err := s.logger(stderr)
	if err != nil {
		return err
	}
	keys, err := s.keys(log, false)
	if err != nil {
		return err
	}
	a := newApp(log)
	defer a.close()
	nc, err := a.connect(f.NATS)
	if err != nil {
		return err
	}
	if err := a.addCollector(nc, f.Collector, keys, f.Catalog); err != nil {
		return err
	}
	// Nothing else here needs NATS: the collector's own check says whether
	// it spools while NATS is away (ready, degraded) or cannot take events.
	delete(a.checks, "nats")
	return a.serve(ctx, s, func(addr string) {
		log.Info("collector listening", "addr", addr, "nats", nc.ConnectedUrlRedacted())
	})
}
