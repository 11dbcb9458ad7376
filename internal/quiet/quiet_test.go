package quiet

import (
	"bytes"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestDefaults(t *testing.T) {
	var (
		log *slog.Logger
		reg prometheus.Registerer
	)
	Defaults(&log, &reg)
	if log == nil || reg == nil || reg == prometheus.DefaultRegisterer {
		t.Fatalf("defaults: logger %v, registerer %v", log, reg)
	}
	if log.Enabled(t.Context(), slog.LevelError) {
		t.Fatal("the default logger does not discard")
	}
	var buf bytes.Buffer
	mine, myReg := slog.New(slog.NewTextHandler(&buf, nil)), prometheus.NewRegistry()
	log, reg = mine, myReg
	Defaults(&log, &reg)
	if log != mine || reg != myReg {
		t.Fatal("Defaults replaced what was given")
	}
}
