# conv3d: set-up and common jobs. Every target creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONV3D  = $(BIN)/conv3d
DEMO    = demo_out
S       = sample_data

.PHONY: demo test lint bench batch clean help FORCE

help:
	@echo "make demo    run conv3d on sample_data/ (writes $(DEMO)/)"
	@echo "make test    lint, then run the test suite"
	@echo "make lint    check the code with ruff (rules in pyproject.toml)"
	@echo "make bench   benchmark the engine against PyTorch and SciPy"
	@echo "make batch IN=dir OUT=dir ARGS='...' [SUFFIX=_x] [EXT=.nii.gz]"
	@echo "            conv3d run on every volume in IN; up-to-date outputs skipped (make -j works)"

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
	$(CONV3D) preview $(S)/brain.nii.gz $(DEMO)/brain_down.nii.gz $(DEMO)/brain_edges.nii.gz \
		--channel 1 -o $(DEMO)/brain_preview.png --overwrite
	@echo
	@echo "Wrote:"; ls -l $(DEMO)

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || echo "torch not installable: skipped in the table"
	$(BIN)/python benchmarks/bench.py

# make batch IN=scans OUT=filtered ARGS="--weights sobel3.npz --padding same" [SUFFIX=_f] [EXT=.nii.gz]
#
# One target per volume in IN (*.npy *.nii *.nii.gz *.h5 *.hdf5 *.mgh *.mgz *.nrrd *.tif
# *.tiff files, *.zarr stores). An output keeps its input's name and format (SUFFIX is
# appended to the name, EXT converts) and is remade when its input, ARGS, or a file ARGS
# names (weights, config) changed:
# OUT/.conv3d-batch.stamp holds ARGS and those files' checksums and is rewritten only when
# they differ. Each conv3d gets --workers = cores / make's -j jobs unless ARGS sets one.
# Under make -C the recipes run in this clone, where relative paths would silently name
# other files: IN, OUT and the paths in ARGS must then be absolute.
BATCH_EXTS     = .npy .nii .nii.gz .h5 .hdf5 .zarr .mgh .mgz .nrrd .tif .tiff
BATCH_OUT_EXTS = $(BATCH_EXTS) .hdf .he5
BATCH_STAMP    = $(OUT)/.conv3d-batch.stamp

ifneq ($(filter batch,$(MAKECMDGOALS)),)
ifeq ($(and $(IN),$(OUT)),)
$(error usage: make batch IN=dir OUT=dir [ARGS='conv3d run options'] [SUFFIX=_x] [EXT=.nii.gz])
endif
# Option values in ARGS (also after '='); those that may name files: with a file extension,
# or naming one in the caller's directory (not e.g. --layer-name encoder/conv3d_2).
BATCH_VALUES := $(filter-out -%,$(foreach w,$(ARGS),$(if $(findstring =,$(w)),$(lastword $(subst =, ,$(w))),$(w))))
BATCH_PATHS  := $(foreach w,$(BATCH_VALUES),$(if $(or $(filter %.npz %.npy %.json %.keras %.h5 %.hdf5,$(w)),$(wildcard $(PWD)/$(w))),$(w)))
BATCH_ELSEWHERE := $(and $(realpath $(PWD)),$(filter-out $(realpath $(CURDIR)),$(realpath $(PWD))))
BATCH_RELATIVE  := $(filter-out /% ~%,$(IN) $(OUT) $(BATCH_PATHS))
ifneq ($(and $(BATCH_ELSEWHERE),$(BATCH_RELATIVE)),)
$(error batch: make runs in $(CURDIR) (make -C), not in $(PWD): give absolute paths instead of $(BATCH_RELATIVE) (e.g. $(PWD)/$(firstword $(BATCH_RELATIVE))))
endif
BATCH_DIR := $(patsubst %/,%,$(IN))
ifeq ($(wildcard $(BATCH_DIR)/.),)
$(error batch: IN=$(IN) is not a directory)
endif
ifeq ($(realpath $(BATCH_DIR)),$(realpath $(OUT)))
$(error batch: OUT=$(OUT) is IN; write the outputs to another directory)
endif
BATCH_IN := $(sort $(wildcard $(addprefix $(BATCH_DIR)/*,$(BATCH_EXTS))))
ifeq ($(BATCH_IN),)
$(error batch: IN=$(IN) holds no volumes ($(addprefix *,$(BATCH_EXTS))))
endif
BATCH_EXT := $(if $(EXT),$(if $(filter .%,$(EXT)),$(EXT),.$(EXT)))
ifneq ($(filter-out $(BATCH_OUT_EXTS),$(BATCH_EXT)),)
$(error batch: EXT=$(EXT) is not one of $(BATCH_OUT_EXTS))
endif
batch_ext = $(if $(filter %.nii.gz,$(1)),.nii.gz,$(suffix $(1)))
batch_out = $(OUT)/$(patsubst %$(call batch_ext,$(1)),%,$(notdir $(1)))$(SUFFIX)$(or $(BATCH_EXT),$(call batch_ext,$(1)))
BATCH_OUT := $(foreach f,$(BATCH_IN),$(call batch_out,$(f)))
ifneq ($(words $(BATCH_OUT)),$(words $(sort $(BATCH_OUT))))
$(error batch: two inputs in $(IN) give the same output name; set SUFFIX or EXT differently)
endif
BATCH_FILES := $(foreach f,$(wildcard $(BATCH_VALUES)),$(if $(wildcard $(f)/.),,$(f)))
BATCH_SIG   := conv3d run ARGS: $(ARGS)$(if $(BATCH_FILES), files: $(shell cksum $(BATCH_FILES)))
ifndef NPROC
NPROC := $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
endif

# -jN reaches MAKEFLAGS only when recipes run, so these expand there; a bare -j is unlimited.
BATCH_JOBS    = $(if $(filter -j,$(MAKEFLAGS)),$(NPROC),$(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),1))
BATCH_WORKERS = $(if $(filter --workers --workers=%,$(ARGS)),,--workers $(shell n=$$(( $(NPROC) / $(BATCH_JOBS) )); [ $$n -ge 1 ] || n=1; echo $$n))
# The venv only when the batch uses its conv3d (CONV3D=/path/to/conv3d uses another install).
BATCH_TOOL    = $(if $(filter $(BIN)/conv3d,$(CONV3D)),$(STAMP))

batch: $(BATCH_OUT)
	@echo "batch: $(words $(BATCH_OUT)) volume(s) up to date in $(OUT)"

# A Zarr store's own mtime does not change when its chunks do: the first file in it newer
# than the output, if any, is a prerequisite.
define batch_rule
$(call batch_out,$(1)): $(1) $(if $(filter %.zarr,$(1)),$(shell find '$(1)' -newer '$(call batch_out,$(1))' -print -quit 2>/dev/null)) $$(BATCH_STAMP) $$(BATCH_FILES) | $$(BATCH_TOOL) $$(OUT)
	$$(CONV3D) run $$< $$@ --overwrite --quiet $$(BATCH_WORKERS) $$(ARGS)
endef
$(foreach f,$(BATCH_IN),$(eval $(call batch_rule,$(f))))

# Rewritten only when ARGS or the files it names changed, so only then are outputs remade.
ifneq ($(BATCH_SIG),$(file <$(BATCH_STAMP)))
$(BATCH_STAMP): FORCE
endif
$(BATCH_STAMP): | $(OUT)
	@printf '%s\n' '$(subst ','\'',$(BATCH_SIG))' > $@

$(OUT):
	mkdir -p $@

FORCE:
endif

clean:
	rm -rf $(DEMO) .pytest_cache
