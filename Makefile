# conv3d: set-up and common jobs. Every target creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONV3D  = $(BIN)/conv3d
DEMO    = demo_out
S       = sample_data

.PHONY: demo test bench batch clean help

help:
	@echo "make demo    run conv3d on sample_data/ (writes $(DEMO)/)"
	@echo "make test    run the test suite"
	@echo "make bench   benchmark the engine against PyTorch and SciPy"
	@echo "make batch IN=dir OUT=dir ARGS='...'   conv3d run on every volume in IN (make -j works)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(DEMO)
	$(CONV3D) info $(S)/brain.nii.gz
	$(CONV3D) shape $(S)/brain.nii.gz --weights $(S)/sobel3.npz --padding same
	$(CONV3D) run $(S)/brain.nii.gz $(DEMO)/brain_edges.nii.gz --weights $(S)/sobel3.npz \
		--padding same --overwrite
	$(CONV3D) run $(S)/brain.nii.gz $(DEMO)/brain_down.nii.gz --filters 4 --kernel-size 3 \
		--strides 2 --padding same --activation relu --seed 0 \
		--save-weights $(DEMO)/brain_down_weights.npz --overwrite
	$(CONV3D) run $(S)/cells.h5:/stacks/cells $(DEMO)/cells_up.h5:/upsampled \
		--layer Conv3DTranspose --filters 1 --kernel-size 3 --strides 2 --padding same \
		--seed 0 --overwrite
	$(CONV3D) run $(S)/grid.npy $(DEMO)/grid_smooth.npy --config $(S)/smooth.json \
		--report $(DEMO)/grid_smooth.json --overwrite
	$(CONV3D) export $(DEMO)/sobel3.keras --weights $(S)/sobel3.npz --padding same --overwrite
	$(CONV3D) layers $(DEMO)/sobel3.keras
	$(CONV3D) run $(S)/brain.nii.gz $(DEMO)/brain_edges.zarr --weights $(DEMO)/sobel3.keras \
		--scheduler local --workers 2 --overwrite
	$(CONV3D) info $(DEMO)/brain_down.nii.gz
	@echo
	@echo "Wrote:"; ls -l $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo "torch not installable: skipped in the table"
	$(BIN)/python benchmarks/bench.py

# make batch IN=scans OUT=out ARGS="--filters 1 --kernel-size 3 --weights w.npz"
ifdef IN
BATCH_IN  := $(wildcard $(IN)/*.npy $(IN)/*.nii $(IN)/*.nii.gz $(IN)/*.h5 $(IN)/*.hdf5)
BATCH_OUT := $(patsubst $(IN)/%,$(OUT)/%,$(BATCH_IN))
endif

batch: $(BATCH_OUT)
	@test -n "$(IN)" -a -n "$(OUT)" || (echo "usage: make batch IN=dir OUT=dir ARGS='...'"; exit 2)
	@echo "batch: $(words $(BATCH_OUT)) volume(s) up to date in $(OUT)"

$(OUT)/%: $(IN)/% | $(STAMP)
	@mkdir -p $(dir $@)
	$(CONV3D) run $< $@ --overwrite --quiet $(ARGS)

clean:
	rm -rf $(DEMO) .pytest_cache
