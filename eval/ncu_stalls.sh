# Source-level stall sampling of the fwd/bwd kernels at N=32768 (ncu WarpStateStats +
# SourceCounters). Run on the device: export OUT; bash eval/ncu_stalls.sh. Writes $OUT/{fwd,bwd}_sass.csv.
PY=/opt/torch/.venv/bin/python3
M="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for k in ${NCU_KERNELS:-fwd bwd}; do
  if [ $k = fwd ]; then RUN="--ncu-fwd 32768"; else RUN="--ncu-bwd 32768"; fi
  timeout 200 ncu --clock-control none -k regex:${k}_kernel -s 1 -c 1 --section WarpStateStats --section SourceCounters --metrics "$M" --import-source no -o $OUT/$k $PY -m eval.bench_cuda $RUN > $OUT/$k.log 2>&1
  ncu -i $OUT/$k.ncu-rep --page details --print-units base > $OUT/${k}_details.txt 2>&1
  ncu -i $OUT/$k.ncu-rep --page source --csv --print-source sass > $OUT/${k}_sass.csv 2>&1
  echo "== $k"; grep -E "stalled" $OUT/${k}_details.txt | sort -k3 -g -r | head -12 | awk '{print $1, $NF}'
  ls -la $OUT/${k}_sass.csv; rm -f $OUT/$k.ncu-rep
done
