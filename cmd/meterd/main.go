// Command meterd is the one binary of meterd: each subcommand runs one
// component (collector, aggregator, enforcer) or all of them (dev).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/meterd/meterd/cmd/meterd/internal/cli"
	"github.com/meterd/meterd/cmd/meterd/internal/demo"
)

const usage = `meterd — usage metering with instant 402 enforcement

Usage:
  meterd demo                 a guided run: tenants, quotas, 402s, a webhook, reports (under a minute)
  meterd dev        [flags]   every component in one process on embedded NATS
  meterd collector  [flags]   the sidecar gateways report usage to
  meterd aggregator [flags]   batches from JetStream into ClickHouse, exactly once
  meterd enforcer   [flags]   quotas and billing status pushed to every gateway
  meterd usage      [flags]   usage reports from a running meterd (table, CSV, JSON)
  meterd usage summary        each tenant's current period against its limits
  meterd tenants list|get|set|delete
                              tenants, their plans, limits and billing status (admin API)
  meterd blocklist            the tenants blocked now, and why
  meterd dlq list|show|replay the batches that could never be processed, and their replay
  meterd version

Run 'meterd <command> -h' for the flags of a command. Every flag can also be
set with its METERD_* environment variable or in the --config YAML file.
`

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the subcommand in args and returns the exit code: 0 on
// success, 2 for a usage error, 1 for any other failure.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch cmd, rest := args[0], args[1:]; cmd {
	case "dev":
		err = runDev(ctx, rest, stdout, stderr)
	case "collector", "aggregator", "enforcer":
		err = runComponent(ctx, cmd, rest, stderr)
	case "usage":
		err = cli.Usage(ctx, rest, stdout, stderr)
	case "dlq":
		err = cli.DLQ(ctx, rest, stdout, stderr)
	case "tenants":
		err = cli.Tenants(ctx, rest, stdout, stderr)
	case "blocklist":
		err = cli.Blocklist(ctx, rest, stdout, stderr)
	case "demo":
		err = demo.Run(ctx, rest, stdout, stderr, func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
			return run(ctx, append([]string{"dev"}, args...), stdout, stderr)
		})
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "meterd", version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "meterd: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	return cli.ExitCode(err, stderr)
}
