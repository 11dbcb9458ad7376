// Package cli is meterd's command line: flags read from the environment,
// usage errors and exit codes shared by every subcommand, and the client
// commands (usage, usage summary, dlq, tenants, blocklist) that talk to a
// running meterd, all printing through one output layer (Table).
package cli

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/meterd/meterd/internal/config"
	"github.com/meterd/meterd/internal/redact"
)

// DevAddr is where `meterd dev` listens unless told otherwise, and so where
// the client commands look for meterd.
const DevAddr = "127.0.0.1:8080"

// UsageError is a mistake on the command line or in the configuration: the
// command exits with 2 instead of 1.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }

// Unwrap returns the mistake.
func (e UsageError) Unwrap() error { return e.Err }

// Mistake marks err as a mistake on the command line or in the
// configuration.
func Mistake(err error) error { return UsageError{err} }

// Mistakef is Mistake(fmt.Errorf(format, a...)).
func Mistakef(format string, a ...any) error { return UsageError{fmt.Errorf(format, a...)} }

// ExitCode prints err, if any, on stderr without the credentials of any URL
// it holds, and returns the exit code of a command that ended with err: 0
// on success or -h, 2 for a UsageError, 1 for any other failure.
func ExitCode(err error, stderr io.Writer) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(UsageError)):
		fmt.Fprintln(stderr, "meterd:", redact.Userinfo(err.Error()))
		return 2
	default:
		fmt.Fprintln(stderr, "meterd:", redact.Userinfo(err.Error()))
		return 1
	}
}

// verbOf reads the command of a command group (`meterd dlq list`) from
// args, one of verbs. -h prints help on stdout and returns flag.ErrHelp;
// no command, or one not in verbs, is a usage error (with help on stderr
// when none was named).
func verbOf(args []string, group, help string, verbs []string, stdout, stderr io.Writer) (string, error) {
	if len(args) > 0 && slices.Contains(verbs, args[0]) {
		return args[0], nil
	}
	if len(args) > 0 && (args[0] == "-h" || args[0] == "--help" || args[0] == "-help") {
		fmt.Fprint(stdout, help)
		return "", flag.ErrHelp
	}
	list := strings.Join(verbs[:len(verbs)-1], ", ") + " or " + verbs[len(verbs)-1]
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprint(stderr, help)
		return "", Mistakef("%s: name a command: %s", group, list)
	}
	return "", Mistakef("%s: unknown command %q: use %s", group, args[0], list)
}

// Parse applies the environment and then the command line to fs, which
// takes no positional argument.
func Parse(fs *flag.FlagSet, args []string) error {
	if err := config.ApplyEnv(fs); err != nil {
		return Mistake(err)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return Mistake(err)
	}
	if fs.NArg() > 0 {
		return Mistakef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// ParseArgs parses flags anywhere among at most maxArgs positional
// arguments, which it returns.
func ParseArgs(fs *flag.FlagSet, args []string, maxArgs int) ([]string, error) {
	if err := config.ApplyEnv(fs); err != nil {
		return nil, Mistake(err)
	}
	return parseArgs(fs, args, maxArgs)
}

// parseArgs is ParseArgs without the environment: for the flags defined
// after ApplyEnv ran, which only the command line may set.
func parseArgs(fs *flag.FlagSet, args []string, maxArgs int) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, Mistake(err)
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		if len(pos) == maxArgs {
			return nil, Mistakef("unexpected argument %q", fs.Arg(0))
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// secretValue is a flag whose value is (or holds) a secret: -h and usage
// errors show its value through show, never as it is.
type secretValue struct {
	p    *string
	show func(string) string
}

func (v secretValue) String() string {
	if v.p == nil || *v.p == "" {
		return ""
	}
	return v.show(*v.p)
}

func (v secretValue) Set(s string) error {
	*v.p = s
	return nil
}

// SecretVar defines a string flag holding a secret, shown through show.
func SecretVar(fs *flag.FlagSet, p *string, name, value, usage string, show func(string) string) {
	*p = value
	fs.Var(secretValue{p, show}, name, usage)
}

// NATSConnFlags are the flags that say how to reach NATS.
func NATSConnFlags(fs *flag.FlagSet, n *config.NATS) {
	SecretVar(fs, &n.URL, "nats-url", cmp.Or(n.URL, nats.DefaultURL), "NATS server `URL`(s), comma separated", redact.Userinfo)
	fs.StringVar(&n.Creds, "nats-creds", n.Creds, "NATS credentials file")
	fs.StringVar(&n.TLSCA, "nats-tls-ca", n.TLSCA, "CA bundle to verify the NATS server")
	fs.StringVar(&n.TLSCert, "nats-tls-cert", n.TLSCert, "client certificate for NATS")
	fs.StringVar(&n.TLSKey, "nats-tls-key", n.TLSKey, "client key for NATS")
}
